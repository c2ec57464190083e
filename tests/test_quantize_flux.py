"""Flux with `model.quantize_base` and `model.offload_blocks`: a tiny Flux trains through the
CLI with the low-memory preset, the estimate counts what loading left on the device, and wrong
settings are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modules.config.loading import load_config
from modules.errors import UserError
from modules.models.flux.memory import KEEP_PRECISE
from modules.models.quantize import is_quantized, tensor_bytes
from modules.models.registry import get_family
from modules.training.memory import estimate_memory
from modules.training.trainer import TrainingRun
from tests.conftest import FAMILY_SETTINGS
from tests.helpers import TinyModel, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flux(tiny_flux_path: Path) -> TinyModel:
    return TinyModel("flux", tiny_flux_path, FAMILY_SETTINGS["flux"])


def measured_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(tensor_bytes(t) for t in tensors.values())


@pytest.mark.slow
def test_low_memory_preset_trains_a_tiny_flux_from_the_cli(
    tiny_flux_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """training_presets/flux_dev_lora_low_memory.json (nf4 base, offloaded blocks) as a user
    runs it, pointed at the tiny model (which has 4 blocks, so 2 of them are offloaded; its
    8-bit AdamW needs CUDA, so plain AdamW here)."""
    workspace = tmp_path / "ws"
    overrides = {
        "model.base_model": str(tiny_flux_path),
        "model.t5_max_length": 16,
        "model.offload_blocks": 2,
        "optimizer.name": "adamw",  # the preset's adamw_8bit needs CUDA
        "data.concepts": json.dumps([{"path": str(tiny_dataset_path)}]),
        "data.resolution": 64,
        "data.workers": 0,
        "training.max_steps": 2,
        "training.gradient_accumulation_steps": 1,
        "sampling.steps": 2,
        "output.workspace_dir": str(workspace),
    }
    result = run_cli(
        "--config-path",
        str(ROOT / "training_presets" / "flux_dev_lora_low_memory.json"),
        *(arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Linear layers quantized to nf4 (bitsandbytes)" in result.stderr
    assert "2 of 4 blocks in CPU memory" in result.stderr
    assert "nf4 (bitsandbytes), the rest bfloat16; 2 blocks in CPU memory" in result.stdout
    keys = load_file(workspace / "my_flux_lora.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert all(torch.isfinite(value).all() for value in keys.values())
    assert (workspace / "samples" / "000002" / "00.png").is_file()


@pytest.mark.parametrize("kind", ["int8", "fp8", "nf4"])
def test_quantized_flux_trains_and_the_estimate_counts_its_weights(
    kind: str, flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """The loaded transformer is quantized (embedders and output kept), the loss stays finite
    over a few steps, and the estimate's transformer line is the loaded transformer's bytes
    plus the two staged blocks of what is offloaded."""
    raw = flux.config(
        tiny_dataset_path,
        tmp_path,
        model={"quantize_base": kind, "offload_blocks": 1},
        training={"max_steps": 3, "gradient_checkpointing": True},
    )
    config = load_config(raw=raw)
    run = TrainingRun(config)
    transformer = run.base.transformer
    linears = {path: m for path, m in transformer.named_modules() if isinstance(m, nn.Linear)}
    kept = {path for path in linears if path.split(".")[0] in KEEP_PRECISE}
    assert kept and all(not is_quantized(linears[path].weight) for path in kept)
    quantized = [m for path, m in linears.items() if path not in kept]
    # the offloaded block's weights are placeholders between its runs
    assert sum(is_quantized(m.weight) for m in quantized) >= len(quantized) * 3 // 4

    estimate = estimate_memory(run.family.memory_profile(run.base, config), config, device="cpu")
    line = next(line for line in estimate.weights if line.label == "Transformer")
    offloader = run.base.transformer_offloader
    assert line.device_bytes == measured_bytes(transformer) + offloader.staging_bytes
    assert line.total_bytes == measured_bytes(transformer) + offloader.offloaded_bytes

    result = run.run()
    assert result.steps == 3 and not result.interrupted
    weights = load_file(result.paths.output)
    assert all(torch.isfinite(value).all() for value in weights.values())


def test_offloading_without_checkpointing_is_a_user_error(
    flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = flux.config(tiny_dataset_path, tmp_path, model={"offload_blocks": 2})
    with pytest.raises(UserError, match=r"offload_blocks=2 needs training\.gradient_checkpointing"):
        TrainingRun(load_config(raw=raw))


def test_more_offloaded_blocks_than_the_transformer_has_is_a_user_error(
    flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = flux.config(
        tiny_dataset_path,
        tmp_path,
        model={"offload_blocks": 5},
        training={"gradient_checkpointing": True},
    )
    with pytest.raises(UserError, match=r"offload_blocks=5: this transformer has 4 blocks"):
        get_family("flux").load(load_config(raw=raw))
