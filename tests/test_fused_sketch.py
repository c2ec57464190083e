"""AdaPreLoRA's sketches taken inside a Linear LoRA's own products, against the plain LoRA and the
tap (`LayerSketch.accumulate`) in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.lora.layers import LoRAConv2d, LoRALinear
from modules.lora.preconditioning.fused_sketch import FusedLinearSketch, _SketchedLoRALinear
from modules.lora.preconditioning.sketch import LayerSketch, ProbeSource
from modules.lora.preconditioning.statistics import SketchStatistics


def _adapter(*, dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(12, 9).requires_grad_(False)
    adapter = LoRALinear(base=base, name="lin", rank=3, alpha=6.0, dropout=dropout)
    nn.init.normal_(adapter.lora_up.weight, std=0.5)
    base.to(dtype)
    adapter.to(dtype)
    adapter.attach()
    return adapter


def _sink(adapter: LoRALinear, *, dtype: torch.dtype = torch.float64) -> LayerSketch:
    m, n = adapter.base.weight.shape
    return LayerSketch(
        rows=torch.zeros(m, 5, dtype=dtype),
        cols=torch.zeros(5, n, dtype=dtype),
        base=adapter.base,
        probes=ProbeSource(size=5, seed=3),
    )


def _micro_batches(dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 12, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.sin().sum()


def test_fused_delta_equals_plain_lora_and_its_sketches_equal_the_tap() -> None:
    """Outputs, the gradients of x, A and B, and both sketches accumulated over two micro-batches,
    to float64 rounding."""
    plain, fused = _adapter(), _adapter()
    reference_sink, fused_sink = _sink(plain), _sink(fused)
    fused.delta_sketch = FusedLinearSketch.alone(fused, fused_sink)
    for x in _micro_batches():
        x_fused = x.detach().clone().requires_grad_()
        y_plain, y_fused = plain.base(x), fused.base(x_fused)
        torch.testing.assert_close(y_fused, y_plain, rtol=1e-12, atol=1e-12)
        grad_out = torch.autograd.grad(_loss(y_plain), y_plain, retain_graph=True)[0]
        _loss(y_plain).backward()
        _loss(y_fused).backward()
        reference_sink.accumulate(x.detach(), grad_out)
        torch.testing.assert_close(x_fused.grad, x.grad, rtol=1e-12, atol=1e-12)
    for name in ("lora_down", "lora_up"):
        ours = getattr(fused, name).weight.grad
        torch.testing.assert_close(ours, getattr(plain, name).weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_sink.rows, reference_sink.rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_sink.cols, reference_sink.cols, rtol=1e-12, atol=1e-12)


def test_fused_delta_applies_lora_dropout_to_the_hidden_features_only() -> None:
    """With a dropout mask the LoRA gradients follow the masked product, while the sketches are
    still those of the layer's whole G (`dY^T x`, which dropout inside the LoRA does not change)."""
    adapter = _adapter()
    sink, reference = _sink(adapter), _sink(adapter)
    a, b = adapter.lora_down.weight, adapter.lora_up.weight
    x = _micro_batches()[0]
    mask = torch.bernoulli(torch.full((2, 4, 3), 0.5, dtype=torch.float64)) / 0.5
    down, up = FusedLinearSketch.alone(adapter, sink).factors.of(0, torch.float64, a=a, b=b)
    out = _SketchedLoRALinear.apply(x, a, b, mask, down, up, sink)
    _loss(out).backward()
    x_ref = x.detach().clone().requires_grad_()
    a_ref, b_ref = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    expected = adapter.scale * ((x_ref @ a_ref.T) * mask) @ b_ref.T
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    _loss(expected).backward()
    for ours, theirs in ((x.grad, x_ref.grad), (a.grad, a_ref.grad), (b.grad, b_ref.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    reference.accumulate(x.detach(), torch.cos(out.detach()))  # d sin(y).sum() / dy
    torch.testing.assert_close(sink.rows, reference.rows, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sink.cols, reference.cols, rtol=1e-12, atol=1e-12)


def test_dropout_in_training_mode_draws_a_mask() -> None:
    adapter = _adapter(dropout=0.5)
    sink = _sink(adapter)
    adapter.delta_sketch = FusedLinearSketch.alone(adapter, sink)
    x = _micro_batches()[0]
    plain = nn.functional.linear(x, adapter.base.weight, adapter.base.bias)
    with torch.no_grad():
        adapter.eval()
        full = adapter.base(x) - plain  # no dropout in eval mode
        adapter.train()
    trained = adapter.base(x) - plain
    assert not torch.allclose(trained, full)  # some hidden features dropped...
    kept = (trained - full).abs().amax(-1) < 1e-12
    assert not kept.all()  # ...and the others scaled up by 1 / keep
    assert sink.rows.abs().sum() == 0  # nothing accumulates before the backward pass
    _loss(trained).backward()
    assert sink.rows.abs().sum() > 0


def test_bf16_factors_give_float32_sketches_close_to_float64() -> None:
    exact, low = _adapter(), _adapter()
    low.base.bfloat16()
    low.bfloat16()  # the same values, rounded
    exact_sink, low_sink = _sink(exact), _sink(low, dtype=torch.float32)
    exact.delta_sketch = FusedLinearSketch.alone(exact, exact_sink)
    low.delta_sketch = FusedLinearSketch.alone(low, low_sink)
    x = _micro_batches()[0]
    _loss(exact.base(x)).backward()
    _loss(low.base(x.detach().bfloat16())).backward()
    assert low.lora_down.weight.grad.dtype == torch.bfloat16
    for ours, theirs in ((low_sink.rows, exact_sink.rows), (low_sink.cols, exact_sink.cols)):
        assert ours.dtype == torch.float32
        error = (ours.double() - theirs).norm() / theirs.norm()
        assert error < 0.02  # bf16 rounding of x, A, B and dY: 0.4% to 0.6% here


def test_autocast_computes_in_its_dtype_and_returns_the_input_dtype() -> None:
    adapter = _adapter(dtype=torch.float32)
    sink = _sink(adapter, dtype=torch.float32)
    reference = _adapter(dtype=torch.float32)
    adapter.delta_sketch = FusedLinearSketch.alone(adapter, sink)
    x = _micro_batches(torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = adapter.delta_sketch.delta(adapter, x), reference.delta(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    # validation without autocast, then autocast again: the widened factors are rebuilt in
    # each dtype, so float32 is exact again
    torch.testing.assert_close(adapter.delta_sketch.delta(adapter, x), reference.delta(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter.delta_sketch.delta(adapter, x)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


def test_statistics_fuse_linear_layers_tap_conv_layers_and_uninstall_both() -> None:
    linear = _adapter(dtype=torch.float32)
    conv = LoRAConv2d(base=nn.Conv2d(2, 3, 3), name="conv", rank=2, alpha=2.0)
    conv.attach()
    statistics = SketchStatistics(
        shapes=[(1, 9, 12), (1, 3, 18)],
        adapters=[[linear], [conv]],
        probes=ProbeSource(size=4, seed=0),
        device=torch.device("cpu"),
    )
    assert isinstance(linear.delta_sketch, FusedLinearSketch) and conv.delta_sketch is None
    assert len(conv.base._forward_hooks) == 2  # the LoRA's delta and the statistics tap
    with pytest.raises(ValueError, match="lin: already takes AdaPreLoRA statistics"):
        SketchStatistics(
            shapes=[(1, 9, 12)],
            adapters=[[linear]],
            probes=ProbeSource(size=4, seed=0),
            device=torch.device("cpu"),
        )
    _loss(linear.base(torch.randn(3, 12))).backward()
    _loss(conv.base(torch.randn(1, 2, 5, 5))).backward()
    assert all(tensor.abs().sum() > 0 for pair in statistics.sketches for tensor in pair)
    statistics.remove()
    assert linear.delta_sketch is None and len(conv.base._forward_hooks) == 1


def test_a_group_shares_its_widened_factors_and_always_sees_the_current_weights() -> None:
    """Two layers in one group; an optimizer step between two forward passes of one cycle, then
    a new cycle (new probes): every forward pass equals the plain LoRA's on the current weights,
    and the sketches of a cycle equal the tap's."""
    layers = [_adapter(dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():
        layers[1].lora_down.weight.mul_(-2.0)  # make the two layers differ
    probes = ProbeSource(size=5, seed=3)
    statistics = SketchStatistics(
        shapes=[(2, 9, 12)], adapters=[layers], probes=probes, device=torch.device("cpu")
    )
    taps = SketchStatistics(
        shapes=[(2, 9, 12)],
        adapters=[layers],
        probes=ProbeSource(size=5, seed=3),
        device=torch.device("cpu"),
        fuse=False,
    )
    factors = {id(layer.delta_sketch.factors) for layer in layers}
    assert len(factors) == 1  # one WidenedFactors for the group
    optimizer = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1)
    for cycle in range(2):
        for _ in range(2):  # two micro-batches, with a weight update in between
            for layer in layers:
                x = _micro_batches()[0]
                plain = nn.functional.linear(x, layer.base.weight, layer.base.bias)
                expected = plain + layer.delta(x)
                y = layer.base(x)
                torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
                _loss(y).backward()
            optimizer.step()
        for (rows, cols), (tap_rows, tap_cols) in zip(
            statistics.sketches, taps.sketches, strict=True
        ):
            # float32 sketch buffers, summed in another order: float32 rounding
            torch.testing.assert_close(rows, tap_rows, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(cols, tap_cols, rtol=1e-6, atol=1e-5)
        optimizer.zero_grad()
        statistics.zero_()
        taps.zero_()
        assert probes.cycle == cycle + 1
    statistics.remove()
    taps.remove()
    assert all(layer.delta_sketch is None for layer in layers)


def test_a_group_mixing_linear_and_1x1_conv_layers_fuses_the_linear_ones() -> None:
    """A 1x1 Conv2d and a Linear of the same matrix shape share a group (same packing key)."""
    linear = _adapter(dtype=torch.float32)
    conv = LoRAConv2d(base=nn.Conv2d(12, 9, 1), name="conv", rank=3, alpha=6.0)
    conv.attach()
    statistics = SketchStatistics(
        shapes=[(2, 9, 12)],
        adapters=[[conv, linear]],
        probes=ProbeSource(size=4, seed=0),
        device=torch.device("cpu"),
    )
    assert linear.delta_sketch is not None and linear.delta_sketch.index == 0
    assert conv.delta_sketch is None and len(conv.base._forward_hooks) == 2
    _loss(linear.base(torch.randn(3, 12))).backward()
    _loss(conv.base(torch.randn(1, 12, 2, 2))).backward()
    rows, cols = statistics.sketches[0]
    assert all(rows[i].abs().sum() > 0 and cols[i].abs().sum() > 0 for i in range(2))
    statistics.remove()
