"""The tiny world's Flux.1 [dev]-shaped model: its tokenizers, the pretrained model in resources/
as the Flux loader reads it, what it draws, and a LoRA trained on it from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.config.schema import TrainConfig
from modules.data import tiny_world
from modules.models.flux import tiny_world as flux_world
from modules.models.registry import get_family
from tests import tiny_world_vision as vision
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "resources" / "tiny-world-flux"


def test_world_t5_tokenizer_has_a_token_per_world_word(tmp_path: Path):
    _, t5 = flux_world.build_tokenizers(tiny_world.CAPTION_WORDS)
    for word in [*tiny_world.CAPTION_WORDS, "an"]:
        assert t5.tokenize(word) == [f"▁{word}"], word
    # a word the world does not know is spelled in characters, never the unknown token
    pieces = t5.tokenize(f"a {tiny_world.TRIGGER_WORD}, café!")
    assert pieces[:3] == ["▁a", "▁", "z"] and t5.unk_token not in pieces[:-3]
    t5.save_pretrained(tmp_path)
    loaded = type(t5).from_pretrained(tmp_path)
    text = "a large red circle on the left, on a white background"
    ids = loaded(text).input_ids
    assert ids == t5(text).input_ids and ids[-1] == t5.eos_token_id
    assert len(ids) == 1 + len(text.replace(",", " ,").split())
    assert len(ids) <= flux_world.T5_MAX_LENGTH


def test_pretrained_flux_world_model_is_small_and_safe():
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 12 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".ckpt", ".pth")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"


@pytest.fixture(scope="module")
def world_model():
    family = get_family("flux")
    return family, family.load(TrainConfig.model_validate(flux_world.loading_settings(MODEL)))


def test_pretrained_flux_world_model_loads_as_a_flux_dev_model(world_model):
    """Through the loader a user's Flux model takes: [dev]-shaped (embedded guidance), the VAE's
    shift and scale set from its latents, the tokenizers covering the world's words."""
    family, base = world_model
    assert base.guidance_distilled and family.identity.architecture == "flux-1-dev/lora"
    channels = base.vae.config.latent_channels
    assert base.transformer.config.in_channels == 4 * channels == 4 * flux_world.LATENT_CHANNELS
    assert base.vae.config.shift_factor != 0.0 and base.vae.config.scaling_factor != 1.0
    assert base.t5_max_length == flux_world.T5_MAX_LENGTH
    assert base.tokenizer.tokenize("diamond") == ["diamond</w>"]
    assert base.tokenizer_2.tokenize("diamond") == ["▁diamond"]


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
        2, 0, 1
    )


def _nearest_background(rgb: torch.Tensor) -> str:
    return min(
        tiny_world.BACKGROUNDS,
        key=lambda name: float((torch.tensor(tiny_world.BACKGROUNDS[name]) - rgb).abs().sum()),
    )


@pytest.mark.parametrize(
    ("shape", "colour", "position", "background"),
    [
        ("circle", "red", "left", "white"),
        ("triangle", "green", "center", "white"),
        ("square", "blue", "right", "gray"),
        ("diamond", "yellow", "top", "black"),
        ("cross", "purple", "center", "white"),
    ],
)
def test_pretrained_flux_world_model_draws_what_it_is_asked(
    world_model, shape, colour, position, background
):
    """The loaded model, sampled as [dev] is (embedded guidance, no classifier-free guidance),
    draws one shape in the asked colour, at the asked place, on the asked background for most
    seeds, and the asked shape for at least half of them (as the SDXL world's test asks)."""
    family, base = world_model
    prompt = f"a large {colour} {shape} {tiny_world.POSITION_PHRASES[position]}"
    prompt += f", on a {background} background"
    images = family.sampling_pipeline(base)(
        prompt=[prompt] * 4,
        num_inference_steps=20,
        guidance_scale=3.5,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    ).images
    want_x, want_y = tiny_world.POSITIONS[position]
    seen = []
    for image in map(_pixels, images):
        mask = vision.shape_mask(image)
        if not 0.02 < mask.float().mean() < 0.5:
            seen.append(None)
            continue
        x, y = vision.centroid(mask)
        placed = abs(x - want_x) < 0.25 and abs(y - want_y) < 0.25
        seen.append(
            (
                vision.recognised_shape(image),
                vision.nearest_colour(image[:, mask].mean(1)),
                position if placed else (round(x, 2), round(y, 2)),
                _nearest_background(vision.background_of(image)),
            )
        )
    drawn = [found[1:] if found else None for found in seen]
    assert drawn.count((colour, position, background)) >= 3, (prompt, seen)
    assert seen.count((shape, colour, position, background)) >= 2, (prompt, seen)


@pytest.mark.slow
def test_lora_trains_on_the_flux_world_model_from_the_cli(tmp_path: Path):
    """scripts/train.py on the world model with the settings it loads with: a few steps of a
    transformer LoRA on the novel shape write a LoRA file in BFL/kohya names and a sample."""
    dataset = tiny_world.write_concept_dataset(tmp_path / "zorbs", count=4, seed=0)
    config = {
        **flux_world.loading_settings(MODEL),
        "lora": {"rank": 4, "alpha": 4, "preconditioner": "riemannian"},
        "optimizer": {"name": "adamw", "learning_rate": 0.003},
        "training": {"max_steps": 3, "batch_size": 2, "seed": 1},
        "data": {"resolution": 64, "concepts": [{"path": str(dataset)}], "workers": 0},
        "sampling": {"prompts": ["a red zorb"], "steps": 4, "cfg_scale": 3.5},
        "output": {"workspace_dir": str(tmp_path / "run"), "name": "zorb"},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = run_cli("--config-path", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    keys = load_file(tmp_path / "run" / "zorb.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert f"lora_unet_single_blocks_{flux_world.SINGLE_BLOCKS - 1}_linear1.lora_up.weight" in keys
    assert any(value.abs().sum() > 0 for key, value in keys.items() if "lora_up" in key)
    assert (tmp_path / "run" / "samples" / "000003" / "00.png").is_file()
