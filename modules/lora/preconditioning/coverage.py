"""Which trainable tensors the preconditioner serves, and a report of those it cannot.

Pairs come from the `_lora_pair` links, never from parameter names. Anything trainable that is
not half of a linked (A, B) pair (a DoRA magnitude, an embedding, a LoHa factor) is listed with
the reason, so switching the feature on is never a silent no-op.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from modules.lora.layers import LoRAModule, lora_pairs
from modules.lora.preconditioning.preconditioner import LoRAPair


@dataclass
class Coverage:
    pairs: list[LoRAPair] = field(default_factory=list)
    ranks_by_part: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (parameter name, reason)

    def summary(self, method: str) -> str:
        parts = "; ".join(
            f"{part}: {sum(ranks.values())} layers at rank "
            + "/".join(str(rank) for rank in sorted(ranks))
            for part, ranks in sorted(self.ranks_by_part.items())
        )
        text = f"{method} preconditioning on {len(self.pairs)} LoRA layers ({parts})"
        if self.left_out:
            shown = ", ".join(f"{name} ({reason})" for name, reason in self.left_out[:5])
            more = f" and {len(self.left_out) - 5} more" if len(self.left_out) > 5 else ""
            text += f"; NOT preconditioned: {len(self.left_out)} tensors: {shown}{more}"
        return text


def _adapter_of_factor(modules: Iterable[nn.Module]) -> dict[int, LoRAModule]:
    return {
        id(module.lora_down.weight): module for module in modules if isinstance(module, LoRAModule)
    }


def find_coverage(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    modules: Iterable[nn.Module],
    part_of: dict[str, str],
    needs_layer: bool,
) -> Coverage:
    """Pairs among the trainable `named_parameters`; `modules` supply each pair's scale and layer.

    `part_of` maps adapter names to model parts for the report; `needs_layer` (AdaPreLoRA) also
    requires a Linear or ungrouped Conv2d layer whose gradient the statistics can sketch.
    """
    trainable = [(name, p) for name, p in named_parameters if p.requires_grad]
    adapters = _adapter_of_factor(modules)
    coverage = Coverage()
    trainable_ids = {id(p) for _, p in trainable}
    paired: set[int] = set()
    for param_a, param_b in lora_pairs(p for _, p in trainable):
        adapter = adapters.get(id(param_a))
        if id(param_b) not in trainable_ids:
            continue  # reported below as a factor whose partner is frozen
        if needs_layer and not _sketchable(adapter):
            continue  # reported below
        paired.update((id(param_a), id(param_b)))
        scale = adapter.scale if adapter is not None else 1.0
        coverage.pairs.append(LoRAPair(a=param_a, b=param_b, scale=scale, adapter=adapter))
        part = part_of.get(adapter.name, "other") if adapter is not None else "other"
        coverage.ranks_by_part[part][param_a.shape[0]] += 1
    for name, param in trainable:
        if id(param) in paired:
            continue
        coverage.left_out.append((name, _reason(param, needs_layer=needs_layer)))
    return coverage


def _sketchable(adapter: LoRAModule | None) -> bool:
    base = adapter.base if adapter is not None else None
    if isinstance(base, nn.Conv2d):
        return base.groups == 1
    return isinstance(base, nn.Linear)


def _reason(param: nn.Parameter, *, needs_layer: bool) -> str:
    role = getattr(param, "_lora_role", None)
    if role is None:
        return "not a linked LoRA factor, e.g. a DoRA magnitude, an embedding or a LoHa factor"
    partner = getattr(param, "_lora_pair", None)
    if partner is None or not partner.requires_grad:
        return f"LoRA factor {role} whose partner is frozen or missing"
    if needs_layer:
        return "AdaPreLoRA needs a Linear or ungrouped Conv2d layer to take statistics from"
    return "its partner is not among the trained parameters"
