"""AdaPreLoRA's Adafactor statistics from a randomized sketch of each layer's full gradient G.

AdaPreLoRA weights rows and columns of `G = dL/dW` (m x n) by their energies, which the factor
gradients `s B^T G` and `s G A^T` do not carry. Forming G exactly costs an extra weight-gradient
GEMM per layer and m x n memory that gradient accumulation would have to keep. Instead the
backward pass accumulates two thin sketches per layer, `G Omega` (m x p) and `Psi^T G` (p x n),
with Gaussian probes drawn afresh each optimizer step: `E |G Omega|^2_row / p` is the exact row
energy, and likewise for columns. The sketches are linear in G, so they add up over micro-batches
and all-reduce like gradients; the Adafactor moving average over steps then averages the sketch
noise away.

Here: the probes, one layer's sketch (`LayerSketch.accumulate`, the reference computation) and
the tap that feeds it from the adapted layer's output (Conv2d layers, and observers in the
benchmarks). A Linear LoRA takes the same sketches inside its own products (`fused_sketch`).
The tap costs about `4 p (m + n)` flops per token and layer and two more reads of the layer's
input and output gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ProbeSource:
    """Gaussian probes of each size, fixed within an optimizer step and redrawn for the next.

    Drawn from a generator seeded by (seed, step cycle), so a resumed run sees the same probes.
    Only every `every`-th cycle is sketched (`active`); the others take no sketches.
    """

    def __init__(self, *, size: int, seed: int, every: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.every = every
        self.cycle = 0
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.cycle % self.every == 0

    def next_cycle(self) -> None:
        self.set_cycle(self.cycle + 1)

    def set_cycle(self, cycle: int) -> None:
        self.cycle = cycle
        self._cache.clear()

    def probes(self, dim: int, *, device: torch.device, role: str) -> torch.Tensor:
        """A (dim x size) float32 Gaussian matrix, shared by every layer of this width."""
        key = (dim, device, role)
        if key not in self._cache:
            generator = torch.Generator(device=device)
            salt = (dim * 2 + (role == "left")) * 1_000_003
            generator.manual_seed((self.seed * 7_919 + self.cycle * 104_729 + salt) % (2**63))
            self._cache[key] = torch.randn(
                dim, self.size, generator=generator, device=device, dtype=torch.float32
            )
        return self._cache[key]


@dataclass
class LayerSketch:
    """Where one layer's sketches accumulate: row `index` of its group's sketch stacks."""

    rows: torch.Tensor  # (m, p) view: sum over the step of G @ Omega
    cols: torch.Tensor  # (p, n) view: sum over the step of Psi^T @ G
    base: nn.Module
    probes: ProbeSource

    def accumulate(self, inputs: torch.Tensor, grad_out: torch.Tensor) -> None:
        m, n = self.rows.shape[0], self.cols.shape[1]
        omega = self.probes.probes(n, device=inputs.device, role="right").to(inputs.dtype)
        psi = self.probes.probes(m, device=inputs.device, role="left").to(grad_out.dtype)
        if isinstance(self.base, nn.Conv2d):
            rows, cols = _conv_sketch(self.base, inputs, grad_out, omega, psi)
        else:
            x = inputs.reshape(-1, n)
            g = grad_out.reshape(-1, m).to(x.dtype)
            if x.dtype == self.rows.dtype:  # float32: accumulate straight into the sketches
                self.rows.addmm_(g.mT, x @ omega)
                self.cols.addmm_((g @ psi).mT, x)
                return
            rows = g.mT @ (x @ omega)
            cols = (g @ psi.to(x.dtype)).mT @ x
        self.rows += rows.float()
        self.cols += cols.float()


def _conv_sketch(
    conv: nn.Conv2d,
    inputs: torch.Tensor,
    grad_out: torch.Tensor,
    omega: torch.Tensor,
    psi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sketches for a Conv2d, whose G is the flattened (out, in*kh*kw) weight gradient."""
    p = omega.shape[1]
    filters = omega.mT.reshape(p, *conv.weight.shape[1:])
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    projected = F.conv2d(inputs, filters, **geometry)  # (batch, p, h, w)
    grad_out = grad_out.to(inputs.dtype)
    rows = torch.einsum("bmhw,bphw->mp", grad_out, projected)
    grad_probe = torch.einsum("bmhw,mp->bphw", grad_out, psi.to(inputs.dtype))
    cols = torch.nn.grad.conv2d_weight(inputs, filters.shape, grad_probe, **geometry)
    return rows, cols.flatten(1)


class _Tap(torch.autograd.Function):
    """Identity on the layer output; its backward feeds (input, output gradient) to a sketch."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, inputs: torch.Tensor, sink: LayerSketch):
        ctx.sink = sink
        ctx.save_for_backward(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        with torch.no_grad():
            ctx.sink.accumulate(inputs.detach(), grad_output)
        return grad_output, None, None


def install_tap(sink: LayerSketch) -> torch.utils.hooks.RemovableHandle:
    """Tap the base layer's output (after the LoRA delta is added); a no-op without autograd."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and output.requires_grad and sink.probes.active):
            return output
        return _Tap.apply(output, args[0], sink)

    return sink.base.register_forward_hook(hook)
