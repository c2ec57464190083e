"""Exact AdaPreLoRA statistics for the benchmarks, through the `GradientStatistics` protocol.

The trainer estimates the row and column energies of each adapted layer's weight gradient G from
thin random sketches (`SketchStatistics`). To measure what that costs and changes, the benchmarks
swap in `ExactStatistics`: the base layer's own weight gradient is G (W_eff = W0 + s B A, so
dL/dW0 = dL/dW_eff), so it turns on `requires_grad` of each adapted base weight (never handing it
to the optimizer) and reads `weight.grad`. `Alongside` lets exact statistics steer a run while
sketches of several sizes observe the same gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.lora.layers import LoRAModule
from modules.lora.preconditioning.sketch import ProbeSource
from modules.lora.preconditioning.statistics import AdafactorMoments, SketchStatistics


class ExactStatistics:
    """`GradientStatistics` from the exact G of every adapted layer: the base weight's gradient.

    `bases[group][layer]` in the group's layer order. The base weights get `requires_grad` (they
    are in no optimizer, so they never move); `zero_` drops their gradients. Single process only:
    `all_reduce_` does nothing.
    """

    def __init__(self, bases: list[list[nn.Module]]) -> None:
        self.bases = bases
        self._cycle = 0
        for layers in bases:
            for base in layers:
                base.weight.requires_grad_(True)

    @property
    def cycle(self) -> int:
        return self._cycle

    @property
    def active(self) -> bool:
        return True  # exact statistics every step

    def set_cycle(self, cycle: int) -> None:
        self._cycle = cycle

    def zero_(self) -> None:
        for layers in self.bases:
            for base in layers:
                base.weight.grad = None
        self._cycle += 1

    def all_reduce_(self) -> None:
        """Nothing to do in this single-process benchmark."""

    def energies(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = [], []
        for base in self.bases[group]:
            weight = base.weight
            grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
            g = grad.detach().flatten(1).float()  # Conv2d: (out, in * kh * kw)
            rows.append(g.square().mean(-1))
            cols.append(g.square().mean(-2))
        return torch.stack(rows), torch.stack(cols)

    def remove(self) -> None:
        for layers in self.bases:
            for base in layers:
                base.weight.grad = None
                base.weight.requires_grad_(False)


def relative_errors(estimate: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|estimate - exact| / |exact| of each layer (row of a (k, d) stack)."""
    return (estimate - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)


class Alongside:
    """The exact statistics steer the run; sketches at several p observe the same gradients.

    Each sketch keeps its own Adafactor moments (same beta2) and the per-step relative error of
    its energies against the exact ones, per layer.
    """

    def __init__(
        self,
        exact: ExactStatistics,
        sketches: dict[int, SketchStatistics],
        *,
        shapes: list[tuple[int, int, int]],
        beta2: float,
        device: torch.device,
    ) -> None:
        self.exact = exact
        self.sketches = sketches
        self.beta2 = beta2
        options = {"dtype": torch.float32, "device": device}
        self.moments = {
            p: [
                AdafactorMoments(
                    rows=torch.zeros(k, m, **options), cols=torch.zeros(k, n, **options)
                )
                for k, m, n in shapes
            ]
            for p in sketches
        }
        # p -> group -> list over steps of (rows, cols) per-layer relative errors
        self.step_errors: dict[int, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {
            p: [[] for _ in shapes] for p in sketches
        }

    @property
    def cycle(self) -> int:
        return self.exact.cycle

    @property
    def active(self) -> bool:
        return True

    def set_cycle(self, cycle: int) -> None:
        self.exact.set_cycle(cycle)
        for sketch in self.sketches.values():
            sketch.set_cycle(cycle)

    def zero_(self) -> None:
        self.exact.zero_()
        for sketch in self.sketches.values():
            sketch.zero_()

    def all_reduce_(self) -> None:
        self.exact.all_reduce_()

    def energies(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = self.exact.energies(group)
        for p, sketch in self.sketches.items():
            sketch_rows, sketch_cols = sketch.energies(group)
            self.moments[p][group].update(
                row_energy=sketch_rows, col_energy=sketch_cols, beta2=self.beta2
            )
            self.step_errors[p][group].append(
                (relative_errors(sketch_rows, rows), relative_errors(sketch_cols, cols))
            )
        return rows, cols

    def remove(self) -> None:
        self.exact.remove()
        for sketch in self.sketches.values():
            sketch.remove()


def adapters_of_groups(run) -> list[list[LoRAModule]]:
    """The adapter of every (group, layer) of the run's preconditioner, in group order."""
    adapter_of = {id(ad.lora_down.weight): ad for ad in run.network.adapters.values()}
    return [[adapter_of[id(a)] for a, _ in group.pairs] for group in run.preconditioner.groups]


def use_exact_statistics(run, *, alongside: tuple[int, ...]) -> Alongside | None:
    """Replace the run's sketch by exact statistics, optionally with observing sketches."""
    preconditioner = run.preconditioner
    preconditioner.statistics.remove()
    adapters = adapters_of_groups(run)
    exact = ExactStatistics([[adapter.base for adapter in layers] for layers in adapters])
    if not alongside:
        preconditioner.statistics = exact
        return None
    groups = preconditioner.groups
    shapes = [(len(g.pairs), g.b.shape[1], g.a.shape[2]) for g in groups]
    device = groups[0].a.device
    seed = preconditioner.settings.seed
    sketches = {
        # taps, not fused: several sketches observe each layer
        p: SketchStatistics(
            shapes=shapes,
            adapters=adapters,
            probes=ProbeSource(size=p, seed=seed),
            device=device,
            fuse=False,
        )
        for p in alongside
    }
    observer = Alongside(
        exact, sketches, shapes=shapes, beta2=preconditioner.settings.beta2, device=device
    )
    preconditioner.statistics = observer
    return observer
