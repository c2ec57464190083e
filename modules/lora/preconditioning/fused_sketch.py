"""AdaPreLoRA's sketches of a Linear layer's G folded into its LoRA's own matrix products.

A rank-r LoRA already multiplies the layer input x by A (r x n) in the forward pass and the
output gradient dY by B (m x r) in the backward pass; the sketches need `x Omega` and `dY Psi`
with p probe columns, then `dY^T (x Omega)` and `(dY Psi)^T x`. Widening the LoRA's products
to r + p columns gives them all with no extra pass over x or dY:

    forward   [s h | x Omega]      = x [s A; Omega^T]^T             (tokens x (r + p))
              out                  = (s h * mask) B^T
    backward  [grad B | G Omega]   = dY^T [s h * mask | x Omega]    (m x (r + p))
              [dh | dY Psi]        = dY [s B | Psi]                 (tokens x (r + p))
              [grad A | Psi^T G]   = [dh * mask | dY Psi]^T x       ((r + p) x n)
              grad x               = (dh * mask) A

Same number of products as the plain LoRA, each p columns wider; the separate tap
(`sketch.install_tap`) reads x and dY twice more, which is what it costs at SDXL width (the
products are memory-bound), and adds four small products per layer. The widened factors
`[s A; Omega^T]` and `[s B | Psi]` change once per optimizer step (new weights, new probes), so
`WidenedFactors` builds them for a whole group of same-shaped layers at the first forward pass
of the step: per layer and micro-batch only the products remain, which is what counts on small
models (call overhead) and on a GPU (kernel launches); they take (r + p) / r times the LoRA's
own size in the products' dtype (SDXL's attention and MLP layers at rank 16 in bf16: 122 MiB).
`sketch.LayerSketch.accumulate` stays the reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.lora.layers import LoRAModule
from modules.lora.preconditioning.sketch import LayerSketch, ProbeSource


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class WidenedFactors:
    """`[s A; Omega^T]` (k, r + p, n) and `[s B | Psi]` (k, m, r + p) of one group of
    same-shaped Linear LoRAs, in the products' dtype, for the current optimizer step.

    Built at the first forward pass after the probes were redrawn (`ProbeSource.next_cycle`, with
    every zeroing of the gradients, so after every optimizer step) and again whenever a factor
    was replaced or changed in place since (its version counter moved), so the forward pass
    always sees the current weights.
    """

    def __init__(self, adapters: list[LoRAModule], probes: ProbeSource) -> None:
        self.adapters = adapters
        self.probes = probes
        self.down = self.up = torch.empty(0)
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # views of down and up
        self._key: tuple | None = None
        self._stamps: list[tuple[int, int, int, int]] = []
        self._scales = torch.empty(0)
        self._scales_key: tuple | None = None

    def of(
        self, index: int, dtype: torch.dtype, *, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s widened factors, (r + p, n) and (m, r + p); `a` and `b` are its
        current factor weights (the caller holds them already: this runs on every forward)."""
        if self._key != (self.probes.cycle, dtype, a.device) or self._stamps[index] != _stamp(a, b):
            self._build(dtype, a.device)
        return self._layers[index]

    @torch.no_grad()
    def _build(self, dtype: torch.dtype, device: torch.device) -> None:
        downs = [adapter.lora_down.weight for adapter in self.adapters]
        ups = [adapter.lora_up.weight for adapter in self.adapters]
        k, (r, n), m, p = len(downs), downs[0].shape, ups[0].shape[0], self.probes.size
        if (self.down.shape, self.down.dtype, self.down.device) != ((k, r + p, n), dtype, device):
            self.down = torch.empty(k, r + p, n, dtype=dtype, device=device)
            self.up = torch.empty(k, m, r + p, dtype=dtype, device=device)
            # views stay valid while the buffers do: filled in place at every build
            self._layers = list(zip(self.down.unbind(), self.up.unbind(), strict=True))
        scale = self._scale_tensor(dtype, device)
        torch.mul(torch.stack(downs), scale, out=self.down[:, :r])
        self.down[:, r:].copy_(self.probes.probes(n, device=device, role="right").mT)
        torch.mul(torch.stack(ups), scale, out=self.up[:, :, :r])
        self.up[:, :, r:].copy_(self.probes.probes(m, device=device, role="left"))
        self._stamps = [_stamp(a, b) for a, b in zip(downs, ups, strict=True)]
        self._key = (self.probes.cycle, dtype, device)

    def _scale_tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Each layer's s as a (k, 1, 1) tensor, in float32 (float64 for float64) so that s A is
        rounded once, like `LoRAModule.delta`. Made again only when an s changed (a loaded
        alpha): copying it to a GPU every step would wait for the GPU's queue."""
        scales = tuple(adapter.scale for adapter in self.adapters)
        key = (scales, torch.float64 if dtype == torch.float64 else torch.float32, device)
        if key != self._scales_key:
            self._scales = torch.tensor(scales, dtype=key[1], device=device)[:, None, None]
            self._scales_key = key
        return self._scales


def _stamp(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, int]:
    return (id(a), a._version, id(b), b._version)


class _SketchedLoRALinear(torch.autograd.Function):
    """`((x (s A)^T) * mask) B^T`, whose backward also accumulates the layer's two sketches.

    `down` = [s A; Omega^T] and `up` = [s B | Psi] (`WidenedFactors`) are in the dtype of `x`,
    the dtype the products run in; `a` and `b` are the parameters, which get the gradients."""

    @staticmethod
    def forward(ctx, x, a, b, mask, down, up, sink: LayerSketch):
        r, n = a.shape
        flat = x.reshape(-1, n)
        widened = flat @ down.mT  # [s h | x Omega]
        hidden = widened[:, :r]
        if mask is not None:
            hidden.mul_(mask.reshape(-1, r))  # s h * mask: grad B = dY^T of it
        out = hidden @ _as(b, x.dtype).mT
        ctx.save_for_backward(flat, a, b, widened, mask, up)
        ctx.sink, ctx.input_shape = sink, x.shape
        return out.reshape(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        flat, a, b, widened, mask, up = ctx.saved_tensors
        sink: LayerSketch = ctx.sink
        r, m = a.shape[0], b.shape[0]
        dtype = widened.dtype
        dy = _as(grad_out.reshape(-1, m), dtype)
        right = dy.mT @ widened  # [grad B | G Omega]
        sink.rows.add_(right[:, r:])
        down = dy @ up  # [dh | dY Psi]
        grad_hidden = down[:, :r]
        if mask is not None:
            grad_hidden.mul_(mask.reshape(-1, r))
        left = down.mT @ flat  # [grad A | Psi^T G]
        sink.cols.add_(left[r:])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ _as(a, dtype)).reshape(ctx.input_shape)
        grad_a, grad_b = _as(left[:r], a.dtype), _as(right[:, :r], b.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None


@dataclass
class FusedLinearSketch:
    """Installed as a `LoRALinear`'s `delta_sketch`: its delta then fills `sink` on backward.

    `factors.adapters[index]` is the adapter it is installed on."""

    sink: LayerSketch
    factors: WidenedFactors
    index: int

    @classmethod
    def alone(cls, adapter: LoRAModule, sink: LayerSketch) -> FusedLinearSketch:
        """For a single layer, not part of a group."""
        return cls(sink=sink, factors=WidenedFactors([adapter], sink.probes), index=0)

    def applies(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and self.sink.probes.active

    def delta(self, adapter: LoRAModule, x: torch.Tensor) -> torch.Tensor:
        """The LoRA delta of `x` (in its dtype), computed in the dtype `LoRAModule.delta` uses."""
        a, b = adapter.lora_down.weight, adapter.lora_up.weight
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
        mask = None
        dropout = adapter.dropout
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            keep = 1.0 - dropout.p
            shape = (*x.shape[:-1], a.shape[0])
            mask = torch.empty(shape, dtype=dtype, device=x.device).bernoulli_(keep).div_(keep)
        down, up = self.factors.of(self.index, dtype, a=a, b=b)
        inputs = (_as(x, dtype), a, b, mask, down, up, self.sink)
        if not autocast:
            return _as(_SketchedLoRALinear.apply(*inputs), x.dtype)
        with torch.autocast(device_type, enabled=False):  # the products are in `dtype` already
            return _as(_SketchedLoRALinear.apply(*inputs), x.dtype)
