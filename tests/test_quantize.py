"""The quantized frozen base: int8 / fp8 weight-only (torchao) and nf4 (bitsandbytes) on the CPU.

All three run forward and backward on the CPU with the pinned versions (torchao 0.18's fp8
weight-only dequantizes before its matmul), so nothing is skipped here; the GPU kernels are the
benchmark's business (scripts/benchmark_flux_memory.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memory_helpers import flux_inputs, lora_on_blocks, run, tiny_flux
from torch import nn

from modules.models.flux.memory import KEEP_PRECISE
from modules.models.quantize import (
    KINDS,
    is_quantized,
    map_storage,
    quantize_frozen_linears,
    quantized_weight_bytes,
    storage_tensors,
    tensor_bytes,
)

# relative error of a random Gaussian weight matrix after quantization: int8 keeps ~7 bits of a
# row's range, fp8 e4m3 3 mantissa bits, nf4 16 levels per block of 64
WEIGHT_ERROR = {"int8": 0.01, "fp8": 0.04, "nf4": 0.12}


def dequantized(layer: nn.Linear) -> torch.Tensor:
    weight = layer.weight
    if hasattr(weight, "quant_state"):
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.dequantize()


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_is_the_dequantized_one_forward_and_backward(kind: str) -> None:
    """Forward and input gradient equal a plain Linear holding the dequantized weights: the
    gradient that LoRA on earlier layers needs flows exactly through the quantized layer."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 96))
    holder.requires_grad_(False)
    original = holder[0].weight.detach().clone()
    report = quantize_frozen_linears(holder, kind)
    layer = holder[0]
    assert report.layers == 1 and is_quantized(layer.weight) and isinstance(layer, nn.Linear)

    weight = dequantized(layer).float()
    error = (weight - original).norm() / original.norm()
    assert 0 < error < WEIGHT_ERROR[kind]

    x = torch.randn(5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_out = torch.randn(5, 96)
    layer(x).backward(grad_out)
    torch.nn.functional.linear(x_ref, weight, layer.bias).backward(grad_out)
    torch.testing.assert_close(layer(x.detach()), torch.nn.functional.linear(x, weight, layer.bias))
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_flux_lora_trains_on_a_quantized_transformer(kind: str) -> None:
    """The whole transformer quantized (embedders and output kept), LoRA on every block,
    gradient checkpointing on: close to the unquantized output, loss falls, every adapter gets
    a gradient (also those of the first block, behind all the quantized layers)."""
    inputs = flux_inputs()
    reference = tiny_flux()
    with torch.no_grad():
        expected = run(reference, inputs)

    model = tiny_flux()
    report = quantize_frozen_linears(model, kind, keep=KEEP_PRECISE)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert report.layers == sum(is_quantized(m.weight) for m in linears) == 40
    assert set(report.kept) == {
        path
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.split(".")[0] in KEEP_PRECISE
    }
    assert not is_quantized(model.single_transformer_blocks[0].norm.linear.bias)
    quantized = {
        path: m.weight.shape
        for path, m in reference.named_modules()
        if isinstance(m, nn.Linear) and path not in report.kept
    }
    assert report.bytes_before == sum(4 * shape.numel() for shape in quantized.values())
    assert report.bytes_after == sum(quantized_weight_bytes(s, kind) for s in quantized.values())
    with torch.no_grad():
        output = run(model, inputs)
    error = ((output - expected).norm() / expected.norm()).item()
    assert error < WEIGHT_ERROR[kind] / 2, error

    network = lora_on_blocks(model)
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-2)
    target = expected + 0.5 * torch.randn(
        expected.shape, generator=torch.Generator().manual_seed(5)
    )
    losses = []
    for step in range(5):
        loss = (run(model, inputs) - target).square().mean()
        loss.backward()
        if step == 0:
            silent = [
                name
                for name, adapter in network.adapters.items()
                if not all(
                    p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters()
                )
            ]
            assert not silent, silent
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("kind", KINDS)
def test_predicted_bytes_are_the_stored_bytes(kind: str) -> None:
    """`quantized_weight_bytes` (what the memory estimate predicts from shapes alone) is what
    the quantized tensors hold, for odd shapes too."""
    shapes = [(96, 64), (7, 3), (130, 33), (300, 1000)]
    holder = nn.Sequential(*(nn.Linear(n, m) for m, n in shapes))
    holder.requires_grad_(False)
    quantize_frozen_linears(holder, kind)
    for layer, shape in zip(holder, shapes, strict=True):
        assert tensor_bytes(layer.weight) == quantized_weight_bytes(shape, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_map_storage_rebuilds_a_quantized_weight(kind: str) -> None:
    """A copy through `map_storage` (what offloading does to move weights) computes the same and
    shares no memory with the original."""
    holder = nn.Sequential(nn.Linear(64, 32))
    holder.requires_grad_(False)
    quantize_frozen_linears(holder, kind)
    weight = holder[0].weight
    copy = map_storage(weight, lambda t: t.clone())
    assert type(copy) is type(weight)
    originals = {t.data_ptr() for t in storage_tensors(weight)}
    assert originals.isdisjoint(t.data_ptr() for t in storage_tensors(copy))
    x = torch.randn(3, 64)
    expected = holder[0](x)
    holder[0].weight = copy if isinstance(copy, nn.Parameter) else nn.Parameter(copy, False)
    torch.testing.assert_close(holder[0](x), expected, rtol=0, atol=0)


def test_keep_holds_back_whole_subtrees_only() -> None:
    """`keep` names module paths: "proj_out" keeps the top-level layer, not the single blocks'
    `proj_out`s; trainable and already quantized layers are left alone."""
    model = tiny_flux()
    model.single_transformer_blocks[1].proj_mlp.requires_grad_(True)
    report = quantize_frozen_linears(model, "int8", keep=("proj_out", "time_text_embed"))
    assert not is_quantized(model.proj_out.weight)
    assert is_quantized(model.single_transformer_blocks[0].proj_out.weight)
    assert not is_quantized(model.single_transformer_blocks[1].proj_mlp.weight)
    assert "time_text_embed.guidance_embedder.linear_1" in report.kept
    line = report.line("transformer")
    assert line.startswith(
        f"transformer: {report.layers} Linear layers quantized to int8 (torchao)"
    )
    assert line.endswith(f"; {len(report.kept)} kept as they were (proj_out, time_text_embed)")
    assert quantize_frozen_linears(model, "nf4", keep=("proj_out", "time_text_embed")).layers == 0


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_frozen_linears(nn.Sequential(nn.Linear(4, 4)), "int4")


def test_cli_output_stays_free_of_torchao_import_noise() -> None:
    """Loading torchao (diffusers imports it when installed) logs CUDA-library load failures on
    CPU machines, a torch deprecation of its enums and a diffusers note on torchao checkpoints,
    and bitsandbytes (imported alongside) a missing optional CPU kernel; none concerns
    Geodesic's weight-only use, and the CLI's notice filter drops them."""
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from modules.util.library_notices import quiet_library_notices\n"
        "quiet_library_notices()\n"
        "import diffusers.quantizers.torchao.torchao_quantizer\n"
        "import torchao.quantization\n"
        "logging.getLogger('torchao').warning('a real torchao warning')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "a real torchao warning" in result.stderr
    for noise in ("Failed to load", "Enum subclass", "torchao` Tensor objects", "triton"):
        assert noise not in result.stderr + result.stdout, result.stderr
