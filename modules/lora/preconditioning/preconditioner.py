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
from torch import nn

from modules.lora.layers import LoRAModule
from modules.lora.preconditioning.adaprelora import AdafactorWeights, adaprelora_precondition_
from modules.lora.preconditioning.graphed_pass import GraphedPass
from modules.lora.preconditioning.linalg import Damping, riemannian_precondition_
from modules.lora.preconditioning.packing import FactorGroup, Pair, pack_pairs
from modules.lora.preconditioning.sketch import ProbeSource
from modules.lora.preconditioning.statistics import (
    AdafactorMoments,
    GradientStatistics,
    SketchStatistics,
)

Method = Literal["riemannian", "adaprelora"]


@dataclass(frozen=True)
class PreconditionerSettings:
    method: Method = "riemannian"
    damping: Damping = field(default_factory=Damping)
    beta2: float = 0.999  # AdaPreLoRA: Adafactor's decay of the row/column moments
    sketch_size: int = 8  # AdaPreLoRA: probes per layer and step
    statistics_every: int = 1  # AdaPreLoRA: refresh the row/column moments every n-th step
    seed: int = 0
    cuda_graph: bool = True  # on a GPU: replay the pass as a CUDA graph


@dataclass(frozen=True)
class LoRAPair:
    """One LoRA layer as the preconditioner sees it: factors, scale, and its adapter module."""

    a: nn.Parameter
    b: nn.Parameter
    scale: float
    adapter: LoRAModule | None = None  # needed by AdaPreLoRA's statistics


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
        self._pass = GraphedPass(
            self._run_pass,
            device=self.groups[0].a.device,
            enabled=settings.cuda_graph,
            outputs=lambda: [t for g in self.groups for t in (g.grad_a, g.grad_b)],
        )
        self.applied_steps = 0
        self.statistics_updates = 0  # AdaPreLoRA: moment updates so far (bias correction)
        self._handles: list[Any] = []
        self.moments: list[AdafactorMoments] = []
        # AdaPreLoRA: each group's Adafactor weights, in buffers that the pass (and so its CUDA
        # graph) reads and that are only ever overwritten in place, after `_weights_updates`
        # moment updates (-1: to be filled)
        self.weights: list[AdafactorWeights] = []
        self._weights_updates = -1
        self.statistics: GradientStatistics | None = None
        if settings.method == "adaprelora":
            self._install_statistics(pairs)

    # -- AdaPreLoRA statistics ----------------------------------------------------------------------

    def _install_statistics(self, pairs: list[LoRAPair]) -> None:
        adapter_of = {id(pair.a): pair.adapter for pair in pairs}
        adapters: list[list[LoRAModule]] = []
        for group in self.groups:
            layers = [adapter_of[id(param_a)] for param_a, _ in group.pairs]
            if any(adapter is None for adapter in layers):
                raise ValueError("AdaPreLoRA needs the adapter module of every LoRA pair")
            adapters.append(layers)  # type: ignore[arg-type]
            k, m, n = len(group.pairs), group.b.shape[1], group.a.shape[2]
            options = {"dtype": torch.float32, "device": group.a.device}
            self.moments.append(
                AdafactorMoments(
                    rows=torch.zeros(k, m, **options), cols=torch.zeros(k, n, **options)
                )
            )
            self.weights.append(
                AdafactorWeights(
                    left=torch.ones(k, m, **options), right=torch.ones(k, n, **options)
                )
            )
        self.statistics = SketchStatistics(
            shapes=[(len(g.pairs), g.b.shape[1], g.a.shape[2]) for g in self.groups],
            adapters=adapters,
            probes=ProbeSource(
                size=self.settings.sketch_size,
                seed=self.settings.seed,
                every=self.settings.statistics_every,
            ),
            device=self.groups[0].a.device,
        )

    def zero_(self) -> None:
        """Start a new accumulation cycle (called with the optimizer's zero_grad)."""
        if self.statistics is not None:
            self.statistics.zero_()

    def _unscale_squares(self) -> Callable[[torch.Tensor], torch.Tensor]:
        scale = self.loss_scale()
        if scale is None:
            return lambda energy: energy
        return lambda energy: energy / scale.to(energy.device).float().square()

    # -- the step ---------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run before every `optimizer.step()`; the optimizer may be any torch optimizer."""
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.statistics is not None:
            self.statistics.remove()

    @property
    def graphed(self) -> bool:
        """Whether the pass now replays as a CUDA graph (on a GPU, after one step)."""
        return self._pass.graphed

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self.precondition()

    @torch.no_grad()
    def precondition(self) -> None:
        """Replace every pair's gradients by the preconditioned directions (in place)."""
        settings = self.settings
        self.applied_steps += 1
        for group in self.groups:
            group.refresh()
        if settings.method == "adaprelora":
            # eagerly, outside the pass: the bias correction is a host number
            if self.statistics.active:
                self._update_moments()
            self.adafactor_weights()
        self._pass()  # in place; on a GPU a replayed CUDA graph after the first step

    def _run_pass(self) -> None:
        """The pass itself: reads only tensors that stay put, so a CUDA graph can replay it."""
        if self.settings.method == "riemannian":
            riemannian_precondition_(self.groups, self.settings.damping)
        else:
            adaprelora_precondition_(self.groups, self.weights, self.settings.damping)

    def adafactor_weights(self) -> list[AdafactorWeights]:
        """Each group's Adafactor weights from its bias-corrected moments; unit weights while
        there are none yet (the first applied step fell between two statistics steps). They
        change only with the moments, so steps between two statistics steps reuse them; a
        change is copied into `self.weights`, never rebinds it."""
        if self._weights_updates != self.statistics_updates:
            for buffers, fresh in zip(self.weights, self._weights_from_moments(), strict=True):
                buffers.left.copy_(fresh.left)
                buffers.right.copy_(fresh.right)
            self._weights_updates = self.statistics_updates
        return self.weights

    def _weights_from_moments(self) -> list[AdafactorWeights]:
        if self.statistics_updates == 0:
            return [
                AdafactorWeights.from_moments(torch.ones_like(m.rows), torch.ones_like(m.cols))
                for m in self.moments
            ]
        # each update stands for `statistics_every` steps of Adafactor's decay
        decay = self.settings.beta2**self.settings.statistics_every
        correction = 1 - decay**self.statistics_updates
        return [
            AdafactorWeights.from_moments(m.rows / correction, m.cols / correction)
            for m in self.moments
        ]

    def _update_moments(self) -> None:
        """Fold this step's (all-reduced, unscaled) energies into the Adafactor moments."""
        self.statistics.all_reduce_()
        unscale = self._unscale_squares()
        decay = self.settings.beta2**self.settings.statistics_every
        for index, moments in enumerate(self.moments):
            row_energy, col_energy = self.statistics.energies(index)
            moments.update(
                row_energy=unscale(row_energy), col_energy=unscale(col_energy), beta2=decay
            )
        self.statistics_updates += 1

    # -- backups ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.settings.method,
            "applied_steps": self.applied_steps,
            "statistics_updates": self.statistics_updates,
            "cycle": self.statistics.cycle if self.statistics else 0,
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
        # backups from before `statistics_every` updated the moments on every step
        self.statistics_updates = state.get("statistics_updates", self.applied_steps)
        if self.statistics is not None:
            self.statistics.set_cycle(state["cycle"])
        for moments, rows, cols in zip(self.moments, state["rows"], state["cols"], strict=True):
            moments.rows.copy_(rows)
            moments.cols.copy_(cols)
        self._weights_updates = -1
