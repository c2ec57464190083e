"""The LoRA gradient preconditioner: one optimizer step pre-hook, for any torch optimizer.

The hook runs inside `optimizer.step()`: after accumulation, all-reduce, unscale and clipping of
the raw gradients, once per applied step (a step the fp16 scaler skips never calls the wrapped
optimizer's step). It replaces each LoRA pair's gradients by the preconditioned directions; the
optimizer (AdamW, SGD, Prodigy, Adafactor...) then treats them as its gradients, and weight decay
still acts on the raw weights. Layers of one shape, dtype and device are stacked and served by one
batched call; the factors stay the Parameters' own tensors, and autograd fills the gradients as
it would without the preconditioner.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modules.lora.layers import LoRAModule
from modules.lora.network import LoRANetwork
from modules.lora.preconditioning.directions import (
    AdafactorWeights,
    AdaPreLoRA,
    Damping,
    Factors,
    Method,
    Riemannian,
    compute_dtype,
    damped_inverses,
)
from modules.lora.preconditioning.statistics import GroupStatistics, ProbeSource

Pair = tuple[nn.Parameter, nn.Parameter]  # (A = lora_down.weight, B = lora_up.weight)


@dataclass(frozen=True)
class Settings:
    method: Literal["riemannian", "adaprelora"] = "riemannian"
    damping: Damping = field(default_factory=Damping)
    beta2: float = 0.999  # AdaPreLoRA: Adafactor's decay of the row/column moments
    probes: int = 8  # AdaPreLoRA: sketch columns per layer and step
    statistics_every: int = 1  # AdaPreLoRA: take statistics on every n-th step only
    seed: int = 0  # AdaPreLoRA: of the probes


@dataclass(frozen=True)
class PairGroup:
    """k LoRA layers of one shape: their (A, B) Parameters, each layer's s, and for AdaPreLoRA
    the Adafactor weights (None: Riemannian). Stacks are (k, rows, columns): Conv2d weights
    flatten to (out, in*kh*kw) matrices."""

    pairs: Sequence[Pair]
    scale: torch.Tensor
    weights: AdafactorWeights | None = None

    @property
    def method(self) -> Method:
        return Riemannian() if self.weights is None else AdaPreLoRA(self.weights)

    def factors(self) -> Factors:
        a, b = zip(*self.pairs, strict=True)
        return Factors.of(a=_stacked(a), b=_stacked(b), scale=self.scale)

    def gradients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A missing gradient counts as zero: both methods are linear in the gradients."""

        def stacked_grads(factors: Sequence[nn.Parameter]) -> torch.Tensor:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in factors]
            return _stacked(grads).to(dtype)

        a, b = zip(*self.pairs, strict=True)
        return stacked_grads(a), stacked_grads(b)

    def assign(self, directions: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Each present gradient becomes a view of its stack's direction, in the factor's dtype:
        assigned, not copied, which saves a write and a read of every gradient and, on a GPU,
        one copy kernel per factor. They live until the optimizer's `zero_grad`, like any
        gradient; a missing gradient stays missing."""
        for factors, stack in zip(zip(*self.pairs, strict=True), directions, strict=True):
            first = factors[0]
            shaped = stack.to(first.dtype).view(len(factors), *first.shape).unbind()
            for param, direction in zip(factors, shaped, strict=True):
                if param.grad is not None:
                    param.grad = direction


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors).flatten(2)


@torch.no_grad()
def precondition_pairs_(groups: Sequence[PairGroup], *, damping: Damping) -> None:
    """Replace the gradients of every group's pairs by their directions.

    First every group's Grams, inverted in one batched call per Gram size; then group by group
    the directions, so only one group's stacked gradients exist at a time (the memory estimate
    counts one float32 copy of the LoRA gradients)."""
    grams = [group.method.grams(group.factors()) for group in groups]
    for group, inverse in zip(groups, damped_inverses(grams, damping), strict=True):
        method = group.method
        factors = group.factors() if method.reads_factors else None
        grad_a, grad_b = group.gradients(compute_dtype(group.pairs[0][0].dtype))
        group.assign(method.directions(inverse, grad_a, grad_b, factors))


@dataclass
class _Group:
    """The adapters of one shape, dtype and device, with AdaPreLoRA's statistics for them."""

    adapters: list[LoRAModule]
    statistics: GroupStatistics | None = None
    _scales: tuple[float, ...] = ()
    _scale: torch.Tensor | None = None

    def pairs(self) -> list[Pair]:
        return [adapter.factors for adapter in self.adapters]

    def scale(self) -> torch.Tensor:
        """Each layer's s on the device; made again only when one changed (a loaded alpha), so
        a step does not copy it to the GPU, which would wait for the GPU's queue."""
        scales = tuple(adapter.scale for adapter in self.adapters)
        if scales != self._scales:
            device = self.adapters[0].lora_down.weight.device
            self._scale = torch.tensor(scales, dtype=torch.float32, device=device)
            self._scales = scales
        return self._scale


class LoRAPreconditioner:
    """Preconditions the gradients of `adapters` before every step of the optimizers it is
    attached to. `loss_scale`: the fp16 loss scale as a tensor (or None), which AdaPreLoRA's
    sketches, taken from scaled output gradients, divide out."""

    def __init__(
        self,
        adapters: Sequence[LoRAModule],
        settings: Settings,
        *,
        loss_scale: Callable[[], torch.Tensor | None] = lambda: None,
    ) -> None:
        if not adapters:
            raise ValueError("no LoRA pairs to precondition")
        self.settings = settings
        self.loss_scale = loss_scale
        grouped: dict[tuple, list[LoRAModule]] = defaultdict(list)
        for adapter in adapters:
            a, b = adapter.factors
            grouped[(a.shape, b.shape, a.dtype, a.device)].append(adapter)
        self.groups = [_Group(adapters=members) for members in grouped.values()]
        self.applied_steps = 0
        self.statistics_updates = 0  # AdaPreLoRA: moment updates so far (bias correction)
        self.probes: ProbeSource | None = None
        if settings.method == "adaprelora":
            self.probes = ProbeSource(size=settings.probes, seed=settings.seed)
            for group in self.groups:
                group.statistics = GroupStatistics(group.adapters, self.probes)
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.precondition()))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for group in self.groups:
            if group.statistics is not None:
                group.statistics.remove()

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace every pair's gradients by the preconditioned directions."""
        weights: list[AdafactorWeights | None] = [None] * len(self.groups)
        if self.probes is not None:
            if self.probes.active:
                self._update_statistics()
            weights = self.adafactor_weights()
        groups = [
            PairGroup(pairs=group.pairs(), scale=group.scale(), weights=group_weights)
            for group, group_weights in zip(self.groups, weights, strict=True)
        ]
        precondition_pairs_(groups, damping=self.settings.damping)
        self.applied_steps += 1
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self.probes is not None:
            active = self.applied_steps % self.settings.statistics_every == 0
            self.probes.set_cycle(self.applied_steps, active=active)

    @property
    def _decay(self) -> float:
        """Adafactor's decay per statistics update, which stands for `statistics_every` steps."""
        return self.settings.beta2**self.settings.statistics_every

    def _update_statistics(self) -> None:
        loss_scale = self.loss_scale()
        for group in self.groups:
            group.statistics.update_moments(decay=self._decay, loss_scale=loss_scale)
        self.statistics_updates += 1

    def adafactor_weights(self) -> list[AdafactorWeights]:
        """Each group's Adafactor weights from its bias-corrected moments."""
        correction = 1 - self._decay**self.statistics_updates
        return [
            AdafactorWeights.from_moments(
                group.statistics.moment_rows / correction, group.statistics.moment_cols / correction
            )
            for group in self.groups
        ]

    # -- backups: AdaPreLoRA's moments and the step count that seeds its probes ---------------

    def state_dict(self) -> dict[str, Any]:
        moments = [g.statistics for g in self.groups if g.statistics is not None]
        return {
            "method": self.settings.method,
            "applied_steps": self.applied_steps,
            "statistics_updates": self.statistics_updates,
            "rows": [m.moment_rows.detach().cpu().clone() for m in moments],
            "cols": [m.moment_cols.detach().cpu().clone() for m in moments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        moments = [g.statistics for g in self.groups if g.statistics is not None]
        if state["method"] != self.settings.method or len(state["rows"]) != len(moments):
            raise ValueError(
                f"preconditioner state is for {state['method']!r} with {len(state['rows'])} "
                f"groups, this run uses {self.settings.method!r} with {len(moments)}"
            )
        self.applied_steps = state["applied_steps"]
        self.statistics_updates = state["statistics_updates"]
        for statistics, rows, cols in zip(moments, state["rows"], state["cols"], strict=True):
            statistics.moment_rows.copy_(rows)
            statistics.moment_cols.copy_(cols)
        self._next_cycle()


@dataclass
class Coverage:
    """The adapters the preconditioner serves, and every trainable tensor it leaves alone."""

    adapters: list[LoRAModule] = field(default_factory=list)
    ranks_by_part: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (parameter name, reason)

    def summary(self, method: str) -> str:
        parts = "; ".join(
            f"{part}: {sum(ranks.values())} layers at rank "
            + "/".join(str(rank) for rank in sorted(ranks))
            for part, ranks in sorted(self.ranks_by_part.items())
        )
        text = f"{method} preconditioning on {len(self.adapters)} LoRA layers ({parts})"
        if self.left_out:
            shown = ", ".join(f"{name} ({reason})" for name, reason in self.left_out[:5])
            more = f" and {len(self.left_out) - 5} more" if len(self.left_out) > 5 else ""
            text += f"; NOT preconditioned: {len(self.left_out)} tensors: {shown}{more}"
        return text


def find_coverage(network: LoRANetwork) -> Coverage:
    """The network's adapters with both factors trainable; a trainable tensor that is not one of
    their factors (a frozen partner's other half, a DoRA magnitude, an embedding, a LoHa factor)
    is named with the reason, so switching the feature on is never a silent no-op."""
    coverage = Coverage()
    served: set[int] = set()
    partner_frozen: set[int] = set()
    for name, adapter in network.adapters.items():
        a, b = adapter.factors
        if a.requires_grad and b.requires_grad:
            coverage.adapters.append(adapter)
            coverage.ranks_by_part[network.part_of.get(name, "other")][adapter.rank] += 1
            served.update((id(a), id(b)))
        else:
            partner_frozen.update((id(a), id(b)))
    for name, param in network.named_parameters():
        if param.requires_grad and id(param) not in served:
            reason = (
                "a LoRA factor whose partner is frozen"
                if id(param) in partner_frozen
                else "not a LoRA factor pair, e.g. a DoRA magnitude, an embedding or a LoHa factor"
            )
            coverage.left_out.append((name, reason))
    return coverage
