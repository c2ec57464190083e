"""The set of LoRA adapters injected into one model, and how layers are chosen for them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from modules.errors import UserError
from modules.lora.layers import LoRAModule, UnsupportedLayerError, lora_for

if TYPE_CHECKING:
    from modules.lora.formats import LoRALayout


@dataclass(frozen=True)
class LoRATarget:
    """One model part that can carry LoRA (the UNet, a text encoder, ...)."""

    part: str  # config name of the part (PartSpec.name)
    kohya_prefix: str  # prefix of its adapters' names (PartSpec.kohya_prefix)
    model: nn.Module
    kohya_path: Callable[[str], str] = lambda path: path  # module path as kohya tools name it


def compile_patterns(patterns: Iterable[str]) -> list[tuple[str, re.Pattern[str]]]:
    """A pattern is a substring of the module path, or a regular expression after `re:`."""
    compiled = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                compiled.append((pattern, re.compile(pattern[3:])))
            except re.error as error:
                raise UserError(
                    f"layer pattern {pattern!r} is not a valid regex: {error}"
                ) from None
        else:
            compiled.append((pattern, re.compile(re.escape(pattern))))
    return compiled


def select_layers(
    model: nn.Module, *, patterns: list[str], part: str
) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d modules whose path matches any pattern; every pattern must match something."""
    compiled = compile_patterns(patterns)
    used: set[str] = set()
    selected = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        hits = [raw for raw, regex in compiled if regex.search(path)]
        if hits:
            used.update(hits)
            selected.append((path, module))
    unmatched = [raw for raw, _ in compiled if raw not in used]
    if unmatched:
        raise UserError(
            f"lora layer pattern(s) {', '.join(map(repr, unmatched))} match no Linear or Conv2d "
            f"layer of the {part}; check lora.layer_patterns or use a layer preset"
        )
    return selected


class LoRANetwork(nn.Module):
    """All adapters of a run, keyed by their kohya name (`<kohya prefix>_<module path>`), and
    the file layouts of the model family they were injected into."""

    def __init__(
        self,
        adapters: Iterable[LoRAModule],
        *,
        part_of: dict[str, str],
        module_path: dict[str, str],
        export_path: dict[str, str],
        layouts: Sequence[LoRALayout] = (),
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({adapter.name: adapter for adapter in adapters})
        self.part_of = part_of  # adapter name -> model part ("unet", "text_encoder", ...)
        self.module_path = module_path  # adapter name -> module path inside its part
        self.export_path = export_path  # adapter name -> that path as kohya/diffusers files name it
        self.layouts = tuple(layouts)  # empty: the generic kohya and diffusers layouts

    @classmethod
    def inject(
        cls,
        targets: Iterable[tuple[LoRATarget, list[str]]],
        *,
        rank: int,
        alpha: float,
        dropout: float,
        layouts: Sequence[LoRALayout] = (),
    ) -> LoRANetwork:
        """Create and attach adapters on every layer selected by the patterns of each target."""
        adapters, part_of, module_path, export_path = [], {}, {}, {}
        for target, patterns in targets:
            for path, module in select_layers(target.model, patterns=patterns, part=target.part):
                exported = target.kohya_path(path)
                name = f"{target.kohya_prefix}_{exported.replace('.', '_')}"
                try:
                    adapter = lora_for(module, name=name, rank=rank, alpha=alpha, dropout=dropout)
                except UnsupportedLayerError as error:
                    raise UserError(f"cannot put LoRA on {target.part} layer {error}") from None
                adapters.append(adapter)
                part_of[name] = target.part
                module_path[name] = path
                export_path[name] = exported
        network = cls(
            adapters,
            part_of=part_of,
            module_path=module_path,
            export_path=export_path,
            layouts=layouts,
        )
        network.attach()
        return network

    def attach(self) -> None:
        for adapter in self.adapters.values():
            adapter.attach()

    def detach(self) -> None:
        for adapter in self.adapters.values():
            adapter.detach()

    def parts(self) -> list[str]:
        return sorted(set(self.part_of.values()))

    def pairs(self, part: str | None = None) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Each adapter's (A, B) factor weights (of one part), in adapter order."""
        return [
            adapter.factors
            for name, adapter in self.adapters.items()
            if part is None or self.part_of[name] == part
        ]

    def parameters_of(self, part: str) -> list[nn.Parameter]:
        return [
            p
            for name, adapter in self.adapters.items()
            if self.part_of[name] == part
            for p in adapter.parameters()
        ]
