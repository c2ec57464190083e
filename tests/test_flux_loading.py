"""Loading Flux: a diffusers folder in the configured dtypes, BFL's single-file transformer with
the rest from a folder, and one clear line for every source that cannot load."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.errors import UserError
from modules.models.flux.config import FluxModelConfig
from modules.models.flux.loading import load_flux_pipeline
from modules.models.flux.tiny import build_tiny_flux
from modules.training.trainer import TrainingRun
from tests.flux_checkpoint import bfl_state_dict
from tests.helpers import tiny_config


def test_folder_loads_each_part_in_its_dtype(tiny_flux_path: Path) -> None:
    config = FluxModelConfig(
        base_model=str(tiny_flux_path), text_encoder={"weight_dtype": "float16"}
    )
    pipe = load_flux_pipeline(config)
    assert pipe.transformer.dtype == torch.bfloat16  # the family's default
    assert pipe.text_encoder.dtype == torch.float16
    assert pipe.text_encoder_2.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    saved = load_file(tiny_flux_path / "transformer" / "diffusion_pytorch_model.safetensors")
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, saved[key].to(torch.bfloat16)), key


def _error(tmp_path: Path, dataset: Path, base_model: Path | str, **model) -> str:
    raw = tiny_config(Path(base_model), dataset, tmp_path / "ws", model={"family": "flux", **model})
    with pytest.raises(UserError) as caught:
        TrainingRun(load_config(raw=raw))
    return str(caught.value)


def test_unreachable_sources_say_which_and_why(tiny_dataset_path: Path, tmp_path: Path) -> None:
    message = _error(tmp_path, tiny_dataset_path, "black-forest-labs/FLUX.1-dev")
    assert "as a Hugging Face repo id failed" in message and "offline" in message

    pickled = tmp_path / "flux1-dev.ckpt"
    pickled.write_bytes(b"not loaded")
    assert "only .safetensors single files" in _error(tmp_path, tiny_dataset_path, pickled)

    single = tmp_path / "flux1-dev.safetensors"
    single.write_bytes(b"")
    message = _error(tmp_path, tiny_dataset_path, single)
    assert "a single-file Flux transformer needs model.single_file_config" in message


@pytest.fixture(scope="module")
def bfl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A Flux folder whose transformer is Flux.1-wide (3072: diffusers' single-file converter
    splits BFL's fused layers at that width) with one double and one single block, random
    bfloat16; and that transformer as a BFL single file (`model.diffusion_model.` keys, as
    ComfyUI's checkpoints)."""
    root = tmp_path_factory.mktemp("bfl")
    folder = build_tiny_flux(root / "folder")
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    config.update(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24)
    config["axes_dims_rope"] = (16, 56, 56)
    with torch.device("meta"):
        wide = FluxTransformer2DModel.from_config(config)
    wide = wide.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in wide.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    wide.save_pretrained(folder / "transformer")
    state = {f"model.diffusion_model.{k}": v for k, v in bfl_state_dict(wide.state_dict()).items()}
    single = root / "flux1-wide.safetensors"
    safetensors.torch.save_file(state, single)
    return folder, single


def test_single_file_transformer_loads_the_folders_weights(
    bfl_checkpoint: tuple[Path, Path],
) -> None:
    folder, single = bfl_checkpoint
    config = FluxModelConfig(base_model=str(single), single_file_config=str(folder))
    pipe = load_flux_pipeline(config)
    expected = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = pipe.transformer.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert pipe.text_encoder_2 is not None and pipe.vae.config.shift_factor == pytest.approx(0.1159)
