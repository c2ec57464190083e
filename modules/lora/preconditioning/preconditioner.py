"""The LoRA gradient preconditioner: one optimizer step pre-hook for every optimizer.

It runs where `GradientPipeline.step` calls the optimizer, so after accumulation, all-reduce,
unscale and clipping of the raw gradients, exactly once per applied step (a step the fp16 scaler
skips never reaches it). It replaces each LoRA pair's gradients by the preconditioned directions;
the optimizer (AdamW, SGD, Prodigy, Adafactor...) then treats them as its gradient, and weight
decay still acts on the raw weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from modules.lora.preconditioning.linalg import (
    AdafactorWeights,
    Damping,
    adaprelora_directions,
    riemannian_precondition_,
)
from modules.lora.preconditioning.packing import FactorGroup, Pair, pack_pairs
from modules.lora.preconditioning.sketch import (
    AdafactorMoments,
    LayerSketch,
    ProbeSource,
    install_tap,
)

Method = Literal["riemannian", "adaprelora"]


@dataclass(frozen=True)
class PreconditionerSettings:
    method: Method = "riemannian"
    damping: Damping = field(default_factory=Damping)
    beta2: float = 0.999  # AdaPreLoRA: Adafactor's decay of the row/column moments
    sketch_size: int = 8  # AdaPreLoRA: probes per layer and step
    seed: int = 0


@dataclass(frozen=True)
class LoRAPair:
    """One LoRA layer as the preconditioner sees it: factors, scale, and the layer it adapts."""

    a: nn.Parameter
    b: nn.Parameter
    scale: float
    base: nn.Module | None = None  # needed by AdaPreLoRA's statistics tap


class LoRAPreconditioner:
    """Preconditions the gradients of LoRA pairs in place, batched by shape.

    `loss_scale` returns the fp16 loss scale (a tensor) or None: AdaPreLoRA's sketches are taken
    from scaled output gradients and are unscaled here, without a host sync.
    """

    def __init__(
        self,
        pairs: list[LoRAPair],
        settings: PreconditionerSettings,
        *,
        loss_scale: Callable[[], torch.Tensor | None] = lambda: None,
    ) -> None:
        if not pairs:
            raise ValueError("no LoRA pairs to precondition")
        self.settings = settings
        self.loss_scale = loss_scale
        raw: list[Pair] = [(pair.a, pair.b) for pair in pairs]
        self.groups: list[FactorGroup] = pack_pairs(raw, [pair.scale for pair in pairs])
        self.applied_steps = 0
        self._handles: list[Any] = []
        self.probes = ProbeSource(size=settings.sketch_size, seed=settings.seed)
        self.moments: list[AdafactorMoments] = []
        self.sketches: list[tuple[torch.Tensor, torch.Tensor]] = []
        if settings.method == "adaprelora":
            self._install_sketches(pairs)

    # -- AdaPreLoRA statistics ----------------------------------------------------------------------

    def _install_sketches(self, pairs: list[LoRAPair]) -> None:
        by_param = {id(pair.a): pair for pair in pairs}
        p = self.settings.sketch_size
        for group in self.groups:
            k, m, n = len(group.pairs), group.b.shape[1], group.a.shape[2]
            options = {"dtype": torch.float32, "device": group.a.device}
            rows, cols = torch.zeros(k, m, p, **options), torch.zeros(k, p, n, **options)
            self.sketches.append((rows, cols))
            self.moments.append(
                AdafactorMoments(
                    rows=torch.zeros(k, m, **options), cols=torch.zeros(k, n, **options)
                )
            )
            for index, (param_a, _) in enumerate(group.pairs):
                base = by_param[id(param_a)].base
                if base is None:
                    raise ValueError("AdaPreLoRA needs the adapted layer of every LoRA pair")
                sink = LayerSketch(
                    rows=rows[index], cols=cols[index], base=base, probes=self.probes
                )
                self._handles.append(install_tap(sink))

    def zero_(self) -> None:
        """Start a new accumulation cycle (called with the optimizer's zero_grad)."""
        for rows, cols in self.sketches:
            rows.zero_()
            cols.zero_()
        self.probes.next_cycle()

    def _unscale_squares(self) -> Callable[[torch.Tensor], torch.Tensor]:
        scale = self.loss_scale()
        if scale is None:
            return lambda energy: energy
        return lambda energy: energy / scale.to(energy.device).float().square()

    def _reduce_sketches(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for rows, cols in self.sketches:
            for tensor in (rows, cols):
                dist.all_reduce(tensor)
                tensor /= dist.get_world_size()

    # -- the step ---------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run before every `optimizer.step()`; the optimizer may be any torch optimizer."""
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.precondition()

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace every pair's gradients by the preconditioned directions (in place)."""
        settings = self.settings
        self.applied_steps += 1
        if settings.method == "adaprelora":
            self._reduce_sketches()
            unscale = self._unscale_squares()
            correction = 1 - settings.beta2**self.applied_steps
        for group in self.groups:
            group.refresh()
        if settings.method == "riemannian":
            riemannian_precondition_(self.groups, settings.damping)  # in place
            return
        for index, group in enumerate(self.groups):
            common = {
                "a": group.a,
                "b": group.b,
                "grad_a": group.grad_a,
                "grad_b": group.grad_b,
                "scale": group.scale,
                "damping": settings.damping,
            }
            moments = self.moments[index]
            rows, cols = self.sketches[index]
            moments.update(row_sketch=rows, col_sketch=cols, beta2=settings.beta2, unscale=unscale)
            weights = AdafactorWeights.from_moments(
                moments.rows / correction, moments.cols / correction
            )
            direction_a, direction_b = adaprelora_directions(**common, weights=weights)
            group.grad_a.copy_(direction_a)
            group.grad_b.copy_(direction_b)

    # -- backups ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.settings.method,
            "applied_steps": self.applied_steps,
            "cycle": self.probes.cycle,
            "rows": [m.rows.detach().cpu().clone() for m in self.moments],
            "cols": [m.cols.detach().cpu().clone() for m in self.moments],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.settings.method or len(state["rows"]) != len(self.moments):
            raise ValueError(
                f"preconditioner state is for {state['method']!r} with {len(state['rows'])} "
                f"groups, this run uses {self.settings.method!r} with {len(self.moments)}"
            )
        self.applied_steps = state["applied_steps"]
        self.probes.set_cycle(state["cycle"])
        for moments, rows, cols in zip(self.moments, state["rows"], state["cols"], strict=True):
            moments.rows.copy_(rows)
            moments.cols.copy_(cols)
