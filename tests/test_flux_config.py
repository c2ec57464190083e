"""The Flux section of the config: its parts, formats and the part defaults a preset keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.config.loading import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_parts_given_in_part_keep_their_declared_defaults() -> None:
    """A preset that sets only a part's dtype must not turn that part's training on (it did:
    sdxl_lora.json trained both text encoders) nor trip the frozen T5's check."""
    flux = load_config(
        raw={
            "model": {
                "family": "flux",
                "text_encoder": {"weight_dtype": "float32"},
                "text_encoder_2": {"weight_dtype": "float32"},
            }
        }
    ).model
    assert (flux.text_encoder.train, flux.text_encoder.weight_dtype) == (False, "float32")
    assert (flux.text_encoder_2.train, flux.transformer.train) == (False, True)
    assert flux.transformer.weight_dtype == "bfloat16"
    sdxl = load_config(path=ROOT / "training_presets" / "sdxl_lora.json").model
    assert sdxl.trained_parts() == ["unet"]
    assert sdxl.text_encoder.weight_dtype == "bfloat16"


def test_flux_preset_is_what_the_readme_says() -> None:
    config = load_config(path=ROOT / "training_presets" / "flux_dev_lora.json")
    assert config.model.family == "flux" and config.model.trained_parts() == ["transformer"]
    assert {part.weight_dtype for part in config.model.parts().values()} == {"bfloat16"}
    assert config.training.gradient_checkpointing and config.training.mixed_precision == "bf16"
    assert config.data.cache_text_embeddings and config.data.offload_encoders
    assert (config.output.format, config.sampling.cfg_scale) == ("kohya", 3.5)


@pytest.mark.parametrize(
    ("model", "output", "message"),
    [
        (
            {"family": "sdxl"},
            {"format": "comfyui"},
            r"output.format 'comfyui' is not a layout sdxl",
        ),
        (
            {"family": "flux", "text_encoder_2": {"train": True}},
            {},
            r"T5-XXL text encoder of flux stays frozen",
        ),
        ({"family": "flux", "unet": {"train": True}}, {}, r"unet"),
    ],
)
def test_flux_settings_that_cannot_work_are_refused(
    model: dict, output: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(raw={"model": model, "output": output})


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_flux_saves_in_three_layouts(layout: str) -> None:
    config = load_config(raw={"model": {"family": "flux"}, "output": {"format": layout}})
    assert config.output.format == layout
