"""The memory estimate: weights against the measured bytes of the loaded (and quantized,
offloaded) tiny models, LoRA and optimizer state against the real objects, the activation trace
against what autograd saves in a real forward pass, and the printed lines and warning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from memory_helpers import TINY_FLUX, flux_inputs, lora_on_blocks, tiny_flux
from torch import nn

from modules.config.loading import load_config
from modules.lora.network import LoRANetwork
from modules.models.base import MemoryProfile, WeightGroup
from modules.models.flux.memory import KEEP_PRECISE
from modules.models.meta import meta_copy
from modules.models.offload import BlockOffloader, spread
from modules.models.quantize import quantize_frozen_linears, tensor_bytes
from modules.models.registry import get_family
from modules.training.activation_trace import ActivationTrace, trace_activations
from modules.training.memory import (
    MemoryEstimate,
    WeightLine,
    estimate_memory,
    optimizer_state_bytes,
)
from modules.training.trainer import TrainingRun
from tests.helpers import tiny_config


def measured_bytes(module: nn.Module) -> int:
    """What a module's weights occupy: every parameter and buffer once, quantized or not."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values())


def sdxl_config(
    model: Path, data: Path, workspace: Path, *, train_text: bool = True, **sections
) -> object:
    raw = tiny_config(model, data, workspace, **sections)
    raw["model"].update(
        unet={"train": True, "weight_dtype": "bfloat16"},
        text_encoder={"train": train_text, "weight_dtype": "float16"},
        text_encoder_2={"train": False, "weight_dtype": "float32"},
    )
    return load_config(raw=raw)


def test_weights_are_the_loaded_parts_bytes(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Per part at its dtype, from meta copies, equal to the loaded model's parameter bytes; on
    a GPU the VAE (cached latents) leaves, the trained text encoder stays."""
    config = sdxl_config(tiny_sdxl_path, tiny_dataset_path, tmp_path)
    family = get_family("sdxl")
    base = family.load(config)
    profile = family.memory_profile(base, config)
    assert all(p.is_meta for group in profile.groups for p in group.module.parameters())

    on_cpu = estimate_memory(profile, config, device="cpu")
    loaded = {
        "UNet": base.unet,
        "CLIP-L text encoder": base.text_encoder,
        "OpenCLIP-G text encoder": base.text_encoder_2,
        "VAE": base.vae,
    }
    assert [line.label for line in on_cpu.weights] == list(loaded)
    for line in on_cpu.weights:
        assert line.total_bytes == line.device_bytes == measured_bytes(loaded[line.label])

    estimate = estimate_memory(profile, config)
    on_gpu = {line.label: line for line in estimate.weights}
    assert on_gpu["VAE"].device_bytes == 0 and "cached latents" in on_gpu["VAE"].note
    # a text encoder is trained, so the text embeddings are not cached and both stay
    assert on_gpu["OpenCLIP-G text encoder"].device_bytes == measured_bytes(base.text_encoder_2)
    # the caches fill with their encoders alone on the device: here only the VAE runs
    assert estimate.caching == measured_bytes(base.vae)


def test_the_caching_phase_is_its_encoders_alone(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """With text embeddings cached too, the VAE and both text encoders fill the caches, and
    nothing else is on the device meanwhile (the UNet and LoRA come afterwards)."""
    config = sdxl_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, train_text=False)
    family = get_family("sdxl")
    base = family.load(config)
    estimate = estimate_memory(family.memory_profile(base, config), config)
    encoders = (base.vae, base.text_encoder, base.text_encoder_2)
    assert estimate.caching == sum(measured_bytes(module) for module in encoders)
    assert "  while the caches fill (their encoders alone, before the model): " in "\n".join(
        estimate.lines()
    )
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path)
    raw["data"].update(cache_latents=False, cache_text_embeddings=False)
    uncached = load_config(raw=raw)
    nothing = estimate_memory(family.memory_profile(base, uncached), uncached)
    assert nothing.caching == 0 and "caches fill" not in "\n".join(nothing.lines())


def test_lora_and_optimizer_state_are_the_runs(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """LoRA parameters and bytes as the run injects them; AdamW's state as a real step makes it
    (UNet only: SDXL reads CLIP-L's penultimate layer, so LoRA on its last one gets no gradient
    and AdamW no state for it)."""
    config = sdxl_config(
        tiny_sdxl_path, tiny_dataset_path, tmp_path, train_text=False, training={"max_steps": 1}
    )
    run = TrainingRun(config)
    estimate = estimate_memory(run.family.memory_profile(run.base, config), config, device="cpu")
    params = list(run.network.parameters())
    assert estimate.lora_parameters == sum(p.numel() for p in params)
    assert estimate.lora == estimate.gradients == sum(tensor_bytes(p) for p in params)
    run.run()
    state = [t for s in run.optimizer.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert estimate.optimizer == sum(tensor_bytes(t) for t in state)


@pytest.mark.parametrize(
    ("name", "extra"),
    [("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.0}), ("prodigy", {}), ("adafactor", {})],
)
def test_optimizer_state_of_each_optimizer(name: str, extra: dict, tmp_path: Path) -> None:
    from modules.training.optimizers import create_optimizer

    config = load_config(raw={"optimizer": {"name": name, "learning_rate": 1e-3, **extra}})
    params = [nn.Parameter(torch.randn(4, 40)), nn.Parameter(torch.randn(24, 4))]
    optimizer = create_optimizer(config.optimizer, [{"params": params}])
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values()]
    held = sum(tensor_bytes(t) for t in state if isinstance(t, torch.Tensor) and t.dim() > 0)
    assert optimizer_state_bytes(config, [p.shape for p in params], torch.float32) == held


def flux_group(model: nn.Module, **settings) -> WeightGroup:
    copy = meta_copy(model)
    blocks = [*copy.transformer_blocks, *copy.single_transformer_blocks]
    offloaded = settings.pop("offloaded", [])
    return WeightGroup(
        name="transformer",
        label="Transformer",
        module=copy,
        role="denoiser",
        dtype=torch.bfloat16,
        offloaded_blocks=tuple(blocks[i] for i in offloaded),
        **settings,
    )


@pytest.mark.parametrize("kind", ["none", "int8", "fp8", "nf4"])
def test_quantized_and_offloaded_transformer_weights_are_measured_ones(kind: str) -> None:
    """The estimate predicts quantized sizes from shapes alone; they equal the bytes of the
    transformer after quantization, and the device share after offloading equals what the
    offloader keeps away (plus the two blocks it stages)."""
    model = tiny_flux(dtype=torch.bfloat16)
    offloaded = spread(3, 4)
    keep = KEEP_PRECISE if kind != "none" else ()
    group = flux_group(model, quantize=kind, keep_precise=keep, offloaded=offloaded)
    config = load_config(raw={})
    line = estimate_memory(
        MemoryProfile(groups=[group], lora_targets=[]), config, device="cuda"
    ).weights[0]
    if kind != "none":
        quantize_frozen_linears(model, kind, keep=keep)
    assert line.total_bytes == measured_bytes(model)
    offloader = BlockOffloader(
        [*model.transformer_blocks, *model.single_transformer_blocks], offloaded
    )
    assert line.device_bytes == measured_bytes(model) + offloader.staging_bytes
    assert line.total_bytes == line.device_bytes - offloader.staging_bytes + (
        offloader.offloaded_bytes
    )


def saved_in_a_real_forward(model: nn.Module, inputs: dict, params: set[int]) -> int:
    """Bytes autograd saves in a real CPU forward, each storage once, weights left out."""
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in params}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    return sum(saved.values())


def test_trace_counts_what_a_real_forward_saves() -> None:
    """On the meta device the trace sees the very tensors a real float32 forward saves (the
    CPU's flash attention keeps what the trace's stand-in keeps)."""
    model = tiny_flux()
    network = lora_on_blocks(model)
    inputs = flux_inputs()
    real = saved_in_a_real_forward(model, inputs, {*model.parameters(), *network.parameters()})

    copy = meta_copy(model)
    network = lora_on_blocks_meta(copy)
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    skip = {id(p) for p in (*copy.parameters(), *network.parameters())}
    trace = trace_activations(copy, meta_inputs, checkpointing=False, autocast=None, skip=skip)
    assert trace.kept == real
    assert trace.recompute == 0


def lora_on_blocks_meta(model: nn.Module) -> LoRANetwork:
    with torch.device("meta"):
        return lora_on_blocks(model)


def test_checkpointing_keeps_block_inputs_and_one_block() -> None:
    """With checkpointing, what stays is far less and is the blocks' inputs; the recomputed
    block is the largest block's own tensors; both scale with the batch."""
    copy = meta_copy(tiny_flux())
    network = lora_on_blocks_meta(copy)
    skip = {id(p) for p in (*copy.parameters(), *network.parameters())}

    def trace(batch: int, checkpointing: bool):
        inputs = {k: v.to("meta") for k, v in flux_inputs(batch=batch).items()}
        return trace_activations(
            copy, inputs, checkpointing=checkpointing, autocast=None, skip=skip
        )

    full, lean = trace(2, False), trace(2, True)
    assert 0 < lean.recompute < lean.kept + lean.recompute < full.kept
    width = TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    hidden = 2 * 16 * width * 4  # batch x image tokens x width x float32
    # each of the 4 blocks keeps its image stream (the single blocks: text and image joined)
    assert lean.kept >= 4 * hidden
    double = trace(4, True)
    assert double.kept == pytest.approx(2 * lean.kept, rel=0.05)
    assert double.recompute == 2 * lean.recompute


def test_autocast_stand_in_casts_as_cuda_autocast_does() -> None:
    """Under bf16 autocast a Linear on bf16 inputs and weights saves nothing new, while
    LayerNorm runs (and saves its input) in float32; without autocast it saves bf16."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, elementwise_affine=False))
    model.to(device="meta", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    skip = {id(p) for p in model.parameters()}

    def kept(autocast):
        inputs = {"input": x}
        return trace_activations(
            _Call(model),
            inputs,
            checkpointing=False,
            autocast=autocast,
            skip=skip,
            inputs_require_grad=True,
        ).kept

    mean_and_rstd = 2 * 4 * 4
    assert kept(None) == 4 * 16 * 2 + mean_and_rstd
    assert kept(torch.bfloat16) == 4 * 16 * 4 + mean_and_rstd


class _Call(nn.Module):
    """Calls a module with an `input` keyword (the trace passes keyword inputs)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return self.module(input)


def test_estimate_lines_and_the_out_of_memory_warning(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        training={"batch_size": 2, "gradient_checkpointing": False},
    )
    config = load_config(raw=raw)
    family = get_family("sdxl")
    profile = family.memory_profile(family.load(config), config)
    roomy = estimate_memory(profile, config, available=2**30)
    assert roomy.warning() is None
    text = "\n".join(roomy.lines())
    assert text.startswith("memory estimate for a training step on the GPU:")
    assert "activations at 64x64, batch 2, no gradient checkpointing" in text
    assert "of the 1.00 GiB this GPU has free for the run" in text

    tight = estimate_memory(profile, config, available=roomy.total // 2)
    warning = tight.warning()
    assert warning is not None and warning == tight.lines()[-1]
    assert warning.startswith("warning: a training step needs about")
    assert "training.gradient_checkpointing" in warning
    assert "training.batch_size" in warning
    assert math.isclose(tight.total, roomy.total)


def test_filling_the_caches_can_be_the_peak() -> None:
    """The encoders that fill the caches are alone on the device meanwhile: when they weigh more
    than a training step needs (T5-XXL beside an offloaded nf4 transformer), that is the peak
    warned about, with advice for that phase."""
    gib = 2**30
    estimate = MemoryEstimate(
        weights=(
            WeightLine("Transformer", gib, gib, "nf4"),
            WeightLine(
                "T5-XXL text encoder",
                0,
                9 * gib,
                "bfloat16; in CPU memory",
                leaves=True,
                fills_caches=True,
            ),
            WeightLine("VAE", gib // 8, gib // 8, "float32", fills_caches=True),
        ),
        lora_parameters=1000,
        lora=gib // 8,
        gradients=gib // 8,
        optimizer=gib // 4,
        preconditioner=0,
        activations=ActivationTrace(kept=gib, recompute=gib // 4, largest=gib // 16),
        setting="1024x1024, batch 1, gradient checkpointing",
        optimizer_name="adamw",
        device="cuda",
        available=8 * gib,
        advice="To fit: lower data.resolution.",
        caching_advice="Free memory on this GPU.",
    )
    assert estimate.caching == 9 * gib + gib // 8 > estimate.total
    lines = estimate.lines()
    assert "  while the caches fill (their encoders alone, before the model): 9.12 GiB" in lines
    assert lines[-1].startswith(
        "warning: filling the caches (their encoders alone) needs about 9.12 GiB, more than"
    )
    assert lines[-1].endswith("Free memory on this GPU.")


def test_caching_advice_names_float32_text_encoders(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    config = sdxl_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, train_text=False)
    family = get_family("sdxl")
    estimate = estimate_memory(family.memory_profile(family.load(config), config), config)
    # CLIP-L is float16 here, OpenCLIP-G float32
    assert estimate.caching_advice == "To fit: set model.text_encoder_2.weight_dtype to bfloat16."


def test_the_run_prints_the_estimate_before_the_model_goes_to_the_device(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path, capsys
) -> None:
    """Printed right after loading, before the model moves to the GPU (where a model too large
    would stop the run before its first step), and without drawing from the global random
    generator: the LoRA initialisation, and so every result, stays as it was."""
    config = load_config(raw=tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path))
    family = get_family("sdxl")
    base = family.load(config)
    before = torch.random.get_rng_state()
    estimate_memory(family.memory_profile(base, config), config)
    assert torch.equal(torch.random.get_rng_state(), before)

    TrainingRun(config).run()
    out = capsys.readouterr().out
    assert out.index("memory estimate for a training") < out.index("training 48 LoRA layers")
    assert "  UNet " in out and "  LoRA (" in out and "  training step: about" in out


def test_a_lora_layer_returns_its_base_layers_dtype_under_autocast() -> None:
    """Under autocast a norm hands the next Linear a float32 input; with LoRA the layer still
    returns what its base returns (bfloat16, as PEFT's LoRA layers do), so the activations
    after it, and what autograd keeps of them, stay bfloat16."""
    from modules.lora.layers import lora_for

    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    adapter = lora_for(base, name="layer", rank=2, alpha=2, dropout=0.0)
    nn.init.normal_(adapter.lora_up.weight)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = base(x)
        delta = adapter.delta(x)
        adapter.attach()
        adapted = base(x)
    assert plain.dtype == adapted.dtype == torch.bfloat16 and delta.dtype == torch.float32
    torch.testing.assert_close(adapted, (plain + delta).to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(adapted, plain)
