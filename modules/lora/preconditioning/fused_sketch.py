"""AdaPreLoRA's sketches of a Linear layer's G folded into its LoRA's own matrix products.

A rank-r LoRA already multiplies the layer input x by A (r x n) in the forward pass and the
output gradient dY by B (m x r) in the backward pass; the sketches need `x Omega` and `dY Psi`
with p probe columns, then `dY^T (x Omega)` and `(dY Psi)^T x`. Widening the LoRA's products
to r + p columns gives them all with no extra pass over x or dY:

    forward   [h | x Omega]        = x [A; Omega^T]^T               (tokens x (r + p))
              out                  = s (h * mask) B^T
    backward  [grad B | G Omega]   = dY^T [s h * mask | x Omega]    (m x (r + p))
              [dh | dY Psi]        = dY [s B | Psi]                 (tokens x (r + p))
              [grad A | Psi^T G]   = [dh * mask | dY Psi]^T x       ((r + p) x n)
              grad x               = (dh * mask) A

Same number of products as the plain LoRA, each p columns wider; the separate tap
(`sketch.install_tap`) reads x and dY twice more, which is what it costs at SDXL width (the
products are memory-bound), and adds four small products per layer, which is what it costs on
small models. `sketch.LayerSketch.accumulate` stays the reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.lora.layers import LoRAModule
from modules.lora.preconditioning.sketch import LayerSketch


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _SketchedLoRALinear(torch.autograd.Function):
    """`s * ((x A^T) * mask) B^T`, whose backward also accumulates the layer's two sketches.

    `omega` (p x n) and `psi` (m x p) are the step's probes in the dtype of `x`, the dtype the
    products run in; the sketches (float32) are `sink.rows` and `sink.cols`."""

    @staticmethod
    def forward(ctx, x, a, b, mask, omega, psi, scale: float, sink: LayerSketch):
        r, n = a.shape
        dtype = x.dtype
        flat = x.reshape(-1, n)
        widened = flat @ torch.cat([_as(a, dtype), omega]).mT  # [h | x Omega]
        hidden = widened[:, :r]
        if mask is not None:
            hidden.mul_(mask.reshape(-1, r))
        hidden.mul_(scale)  # now s h * mask: grad B = dY^T of it
        out = hidden @ _as(b, dtype).mT
        ctx.save_for_backward(flat, a, b, widened, mask, psi)
        ctx.scale, ctx.sink, ctx.input_shape = scale, sink, x.shape
        return out.reshape(*x.shape[:-1], b.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        flat, a, b, widened, mask, psi = ctx.saved_tensors
        sink: LayerSketch = ctx.sink
        r, m = a.shape[0], b.shape[0]
        dtype = widened.dtype
        dy = _as(grad_out.reshape(-1, m), dtype)
        up = dy.mT @ widened  # [grad B | G Omega]
        sink.rows.add_(up[:, r:])
        down = dy @ torch.cat([_as(b, dtype) * ctx.scale, psi], dim=1)  # [dh | dY Psi]
        grad_hidden = down[:, :r]
        if mask is not None:
            grad_hidden.mul_(mask.reshape(-1, r))
        left = down.mT @ flat  # [grad A | Psi^T G]
        sink.cols.add_(left[r:])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_hidden @ _as(a, dtype)).reshape(ctx.input_shape)
        grad_a, grad_b = _as(left[:r], a.dtype), _as(up[:, :r], b.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def sketched_lora_linear(
    x: torch.Tensor,
    *,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    sink: LayerSketch,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA delta of `x` with the sketches taken in its backward, computed in the dtype of
    `x`. `mask` is LoRA dropout's scaled keep mask on the hidden r features (shape `x[..., :r]`)."""
    m, n = b.shape[0], a.shape[1]
    omega = _as(sink.probes.probes(n, device=x.device, role="right").mT, x.dtype)
    psi = _as(sink.probes.probes(m, device=x.device, role="left"), x.dtype)
    return _SketchedLoRALinear.apply(x, a, b, mask, omega, psi, scale, sink)


@dataclass
class FusedLinearSketch:
    """Installed as a `LoRALinear`'s `delta_sketch`: its delta then fills `sink` on backward."""

    sink: LayerSketch

    def applies(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and self.sink.probes.active

    def delta(self, adapter: LoRAModule, x: torch.Tensor) -> torch.Tensor:
        a, b = adapter.lora_down.weight, adapter.lora_up.weight
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else a.dtype
        dropout = adapter.dropout
        mask = None
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            keep = 1.0 - dropout.p
            shape = (*x.shape[:-1], a.shape[0])
            mask = torch.empty(shape, dtype=dtype, device=x.device).bernoulli_(keep).div_(keep)
        options = {"a": a, "b": b, "scale": adapter.scale, "sink": self.sink, "mask": mask}
        if not autocast:
            return _as(sketched_lora_linear(_as(x, dtype), **options), x.dtype)
        with torch.autocast(device_type, enabled=False):  # the products are in `dtype` already
            return _as(sketched_lora_linear(_as(x, dtype), **options), x.dtype)
