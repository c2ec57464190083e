"""The memory estimate from a config alone, as the GUI shows it: the base model's config files
give the estimate of the loaded model, and without files to read the family's reference model's
published shapes stand in, named as such in the first line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from modules.config.loading import load_config
from modules.models.registry import get_family
from modules.training.memory import estimate_memory
from modules.training.memory_preview import estimate_for_config, memory_estimate_lines
from tests.helpers import TinyModel

SDXL_UNET_PARAMETERS = 2_567_463_684  # SDXL base 1.0's UNet, as its model card counts it


def test_config_files_give_the_loaded_models_estimate(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Every line equal to the estimate of the loaded model (the trainer's), weights read from
    nowhere; a quantized Flux transformer counted as quantized."""
    model = {"quantize_base": "int8"} if tiny_model.family == "flux" else {}
    config = load_config(raw=tiny_model.config(tiny_dataset_path, tmp_path, model=model))
    family = get_family(config.model.family)
    loaded = estimate_memory(family.memory_profile(family.load(config), config), config)

    preview, source = estimate_for_config(config)

    assert source == f"model shapes from the config files of {tiny_model.path}"
    assert dataclasses.replace(preview, available=None).lines() == loaded.lines()
    lines = memory_estimate_lines(config)
    assert lines[0] == source and lines[1].startswith("memory estimate for a training step")
    if tiny_model.family == "flux":
        assert "int8 (torchao), the rest float32" in lines[2]


def test_without_a_base_model_the_reference_shapes_stand_in() -> None:
    """An empty model.base_model (a new config in the GUI): SDXL base 1.0 at its real size, the
    first line saying so and why."""
    config = load_config(raw={"model": {"unet": {"weight_dtype": "bfloat16"}}})

    estimate, source = estimate_for_config(config)

    assert source.startswith("model shapes of SDXL base 1.0 (model.base_model is empty")
    unet = next(line for line in estimate.weights if line.label == "UNet")
    assert unet.device_bytes == 2 * SDXL_UNET_PARAMETERS
    assert memory_estimate_lines(config)[0] == source


def test_a_single_file_flux_without_its_config_folder_says_what_is_missing(
    tmp_path: Path,
) -> None:
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"")  # never read: only config files are
    config = load_config(
        raw={
            "model": {"family": "flux", "base_model": str(checkpoint)},
            "data": {"resolution": 256},
        }
    )

    estimate, source = estimate_for_config(config)

    assert source.startswith("model shapes of FLUX.1 [dev] (model.base_model")
    assert "needs model.single_file_config" in source
    assert estimate.lora_parameters > 0
