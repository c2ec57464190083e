"""AdaPreLoRA's Adafactor statistics: the row and column energies of each layer's full gradient G.

The factor gradients `s B^T G` and `s G A^T` do not carry them, and forming G would cost a
weight-gradient GEMM and m x n memory per layer, kept through gradient accumulation. Instead a tap
on each adapted layer's output accumulates two thin sketches in the backward pass, `G Omega`
(m x p) and `Psi^T G` (p x n), with Gaussian probes drawn afresh each optimizer step:
`E |G Omega|^2_row / p` is the exact row energy, and likewise for the columns. Sketches are linear
in G, so they add up over micro-batches and average over processes like gradients, and
Adafactor's moving average over steps averages their noise away (sketch against exact statistics:
docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modules.lora.layers import LoRAModule

MOMENT_EPS = 1e-30  # Adafactor's eps1: keeps an all-zero row's moment positive


class ProbeSource:
    """Gaussian probes, shared by every layer of one width within an optimizer step and redrawn
    for the next; seeded by (seed, cycle), so a resumed run draws the same ones. `active`: whether
    this cycle's backward passes take sketches at all."""

    def __init__(self, *, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.cycle = 0
        self.active = True
        self._cache: dict[tuple, torch.Tensor] = {}

    def set_cycle(self, cycle: int, *, active: bool) -> None:
        self.cycle, self.active = cycle, active
        self._cache.clear()

    def probes(self, dim: int, *, left: bool, like: torch.Tensor) -> torch.Tensor:
        """A (dim x size) Gaussian matrix in `like`'s dtype and device (drawn in float32)."""
        key = (dim, left, like.dtype, like.device)
        if key not in self._cache:
            generator = torch.Generator(device=like.device)
            salt = (dim * 2 + left) * 1_000_003
            generator.manual_seed((self.seed * 7_919 + self.cycle * 104_729 + salt) % 2**63)
            drawn = torch.randn(dim, self.size, generator=generator, device=like.device)
            self._cache[key] = drawn.to(like.dtype)
        return self._cache[key]


def layer_sketches(
    down: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, probes: ProbeSource
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(G Omega, Psi^T G)` of one forward/backward of an adapted layer, in its input's dtype.

    `down` is the adapter's A, which has the layer's input geometry: for a Conv2d, G is the
    flattened (out, in*kh*kw) weight gradient and the probes are filters of A's shape."""
    conv = isinstance(down, nn.Conv2d)
    grad_out = grad_out.to(x.dtype)
    m, n = grad_out.shape[1 if conv else -1], down.weight[0].numel()
    omega = probes.probes(n, left=False, like=x)
    psi = probes.probes(m, left=True, like=x)
    if conv:
        filters = omega.mT.reshape(probes.size, *down.weight.shape[1:])
        geometry = {"stride": down.stride, "padding": down.padding, "dilation": down.dilation}
        projected = F.conv2d(x, filters, **geometry)  # (batch, p, h, w)
        rows = torch.einsum("bmhw,bphw->mp", grad_out, projected)
        grad_probe = torch.einsum("bmhw,mp->bphw", grad_out, psi)
        cols = torch.nn.grad.conv2d_weight(x, filters.shape, grad_probe, **geometry).flatten(1)
        return rows, cols
    x, grad_out = x.reshape(-1, n), grad_out.reshape(-1, m)
    # G Omega as the transpose of (x Omega)^T grad_out: a thin (p x tokens) left operand, which
    # BLAS runs many times faster than the (m x tokens) transposed one
    return ((x @ omega).mT @ grad_out).mT, (grad_out @ psi).mT @ x


class _Tap(torch.autograd.Function):
    """Identity on the layer's output; its backward hands (input, output gradient) to the sketch."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, tap: LayerTap) -> torch.Tensor:
        ctx.tap = tap
        ctx.save_for_backward(x)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        ctx.tap.accumulate(x.detach(), grad_output)
        return grad_output, None, None


class LayerTap:
    """A forward hook on one adapted layer that feeds its rows of the group's sketch stacks.

    A new accumulation starts where the layer's B has no gradient at the forward pass (after
    `zero_grad(set_to_none=True)`, torch's default): what a step the fp16 scaler skipped left in
    the sketch is dropped there. Normally the preconditioner has emptied it already.
    """

    def __init__(
        self, adapter: LoRAModule, rows: torch.Tensor, cols: torch.Tensor, probes: ProbeSource
    ) -> None:
        self.adapter, self.rows, self.cols, self.probes = adapter, rows, cols, probes
        self.filled = False
        self.handle = adapter.base.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (self.probes.active and torch.is_grad_enabled() and output.requires_grad):
            return output
        if self.filled and self.adapter.lora_up.weight.grad is None:
            self.clear()
        return _Tap.apply(output, args[0], self)

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        rows, cols = layer_sketches(self.adapter.lora_down, x, grad_out, self.probes)
        self.rows += rows
        self.cols += cols
        self.filled = True

    def clear(self) -> None:
        self.rows.zero_()
        self.cols.zero_()
        self.filled = False


class GroupStatistics:
    """Sketches and Adafactor moments of one shape group of k layers, in float32."""

    def __init__(self, adapters: list[LoRAModule], probes: ProbeSource) -> None:
        a, b = adapters[0].factors
        k, m, n, p = len(adapters), b.shape[0], a[0].numel(), probes.size
        options = {"dtype": torch.float32, "device": a.device}
        self.sketch_rows = torch.zeros(k, m, p, **options)
        self.sketch_cols = torch.zeros(k, p, n, **options)
        self.moment_rows = torch.zeros(k, m, **options)
        self.moment_cols = torch.zeros(k, n, **options)
        self.taps = [
            LayerTap(adapter, self.sketch_rows[i], self.sketch_cols[i], probes)
            for i, adapter in enumerate(adapters)
        ]

    def energies(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squares of each row (k, m) and column (k, n) of G, estimated without bias."""
        m, p = self.sketch_rows.shape[1:]
        n = self.sketch_cols.shape[2]
        rows = self.sketch_rows.square().sum(-1) / (p * n)
        cols = self.sketch_cols.square().sum(-2) / (p * m)
        return rows, cols

    def update_moments(self, *, decay: float, loss_scale: torch.Tensor | None) -> None:
        """Fold this step's sketches into the moments (over all processes, with the fp16 loss
        scale the backward pass saw divided out), then empty them for the next step."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for sketch in (self.sketch_rows, self.sketch_cols):
                dist.all_reduce(sketch)
                sketch /= dist.get_world_size()
        rows, cols = self.energies()
        if loss_scale is not None:
            unscale = loss_scale.to(rows.device, torch.float32).square().reciprocal()
            rows, cols = rows * unscale, cols * unscale
        self.moment_rows.mul_(decay).add_(rows + MOMENT_EPS, alpha=1 - decay)
        self.moment_cols.mul_(decay).add_(cols + MOMENT_EPS, alpha=1 - decay)
        self.sketch_rows.zero_()
        self.sketch_cols.zero_()
        for tap in self.taps:
            tap.filled = False

    def remove(self) -> None:
        for tap in self.taps:
            tap.handle.remove()
