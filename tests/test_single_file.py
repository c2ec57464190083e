"""A single-file SDXL checkpoint in the original (SGM) layout loads with the folder's exact weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file

from modules.models.sdxl.config import SDXLModelConfig
from modules.models.sdxl.loading import load_sdxl_pipeline
from tests.helpers import run_cli, tiny_config
from tests.sgm_checkpoint import write_sgm_checkpoint

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


@pytest.fixture(scope="module")
def sgm_file(tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sgm_checkpoint(tiny_sdxl_path, tmp_path_factory.mktemp("sgm") / "tiny.safetensors")


def test_checkpoint_has_the_original_sdxl_layout(sgm_file: Path) -> None:
    keys = load_file(sgm_file)
    assert infer_diffusers_model_type(keys) == "xl_base"
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks.", "text_model.")) for k in keys)


def test_single_file_loads_the_folder_weights_exactly(sgm_file: Path, tiny_sdxl_path: Path) -> None:
    config = SDXLModelConfig(base_model=str(sgm_file), single_file_config=str(tiny_sdxl_path))
    pipe = load_sdxl_pipeline(config)

    for part, weights_file in WEIGHT_FILES.items():
        expected = load_file(tiny_sdxl_path / weights_file)
        loaded = dict(getattr(pipe, part).named_parameters())
        assert sorted(loaded) == sorted(expected), part
        for key, value in expected.items():
            assert not loaded[key].is_meta, f"{part}.{key} was never loaded"
            assert torch.equal(loaded[key], value), f"{part}.{key} differs"

    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, reference.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=generator)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    timesteps = torch.tensor([10, 500])
    with torch.no_grad():
        ours = pipe.unet(sample, timesteps, text, added_cond_kwargs=added).sample
        theirs = reference(sample, timesteps, text, added_cond_kwargs=added).sample
    assert torch.equal(ours, theirs)


def test_cli_trains_on_a_single_file_checkpoint(
    sgm_file: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    raw = tiny_config(
        sgm_file,
        tiny_dataset_path,
        workspace,
        model={"single_file_config": str(tiny_sdxl_path)},
        training={"max_steps": 2},
    )
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(preset))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workspace / "test-lora.safetensors").is_file()
