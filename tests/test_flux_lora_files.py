"""Flux LoRA files in other tools: diffusers loads every layout with the trainer's outputs, and the
BFL names are the real Flux.1-dev checkpoint's, as ComfyUI and Forge map them."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from transformers import CLIPTextConfig, CLIPTextModel

from modules.lora.formats import build_metadata, read_lora_metadata, save_lora
from modules.models.flux.layers import TRANSFORMER_LAYER_PRESETS
from modules.models.flux.lora_layouts import COMFYUI_FLUX, KOHYA_FLUX
from modules.models.registry import get_family
from tests.flux_checkpoint import bfl_state_dict
from tests.flux_networks import PRESETS, make_network, outputs, transformer_out
from tests.test_lora_formats import loader_complaints, rel_err

# What diffusers (0.42) reads of a Flux LoRA in BFL's names: the blocks' layers (the embedders'
# and final layer's it drops, see lora_layouts.py); and the single blocks' fused q/k/v and MLP
# input (`linear1`) only at Flux.1's width (3072), so those are checked on the wide model below
DIFFUSERS_READS_BFL = [
    r"re:^transformer_blocks\.",
    r"re:^single_transformer_blocks\.\d+\.(proj_out|norm\.linear)$",
]


# --- diffusers loads our files and computes what the trainer computes ---------------------------


@pytest.mark.parametrize(
    ("layout", "preset", "patterns"),
    [
        *(("diffusers", preset, None) for preset in PRESETS),
        ("kohya", "full", DIFFUSERS_READS_BFL),
        ("comfyui", "full", DIFFUSERS_READS_BFL),
    ],
)
def test_diffusers_loads_every_layout_with_identical_outputs(
    layout: str,
    preset: str,
    patterns: list[str] | None,
    flux_pipe: FluxPipeline,
    flux_network_on,
    tiny_flux_path: Path,
    tmp_path: Path,
) -> None:
    network = flux_network_on(preset=preset, patterns=patterns)
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout=layout, metadata={}, dtype=torch.float32)
    trainer = outputs(flux_pipe)
    network.detach()
    base = outputs(flux_pipe)
    network.attach()

    fresh = FluxPipeline.from_pretrained(tiny_flux_path)
    with loader_complaints() as complaints:
        fresh.load_lora_weights(str(file))
    assert complaints == []
    loaded = outputs(fresh)
    for what, expected in trainer.items():
        assert rel_err(base[what], expected) > 1e-3, f"the LoRA should change {what}"
        assert rel_err(loaded[what], expected) < 1e-5, what


@pytest.fixture(scope="module")
def wide_pipe(flux_pipe: FluxPipeline) -> FluxPipeline:
    """A pipeline whose transformer is one single block at Flux.1's width (3072), random."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=0,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(16, 56, 56),
            guidance_embeds=True,
        )
    transformer = transformer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    components = {**flux_pipe.components, "transformer": transformer.eval()}
    return FluxPipeline(**components)


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_diffusers_splits_the_fused_single_block_layers(
    layout: str, wide_pipe: FluxPipeline, tmp_path: Path
) -> None:
    """The single block's q/k/v + MLP input (BFL's `linear1`), fused into one LoRA, loads."""
    transformer = wide_pipe.transformer
    parts = {"transformer": transformer, "text_encoder": wide_pipe.text_encoder}
    network = make_network(parts, patterns=[r"re:^single_transformer_blocks\."], alpha=2.0)
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout=layout, metadata={}, dtype=torch.float32)
    stem = KOHYA_FLUX.layers(network) if layout == "kohya" else COMFYUI_FLUX.layers(network)
    assert (
        len(
            stem[
                "lora_unet_single_blocks_0_linear1"
                if layout == "kohya"
                else "diffusion_model.single_blocks.0.linear1"
            ].adapters
        )
        == 4
    )
    assert f"{next(iter(stem))}.lora_down.weight" in safetensors.torch.load_file(file)
    trainer = transformer_out(transformer)
    network.detach()
    with loader_complaints() as complaints:
        wide_pipe.load_lora_weights(str(file))
    try:
        assert complaints == []
        assert rel_err(transformer_out(transformer), trainer) < 1e-5
    finally:
        wide_pipe.unload_lora_weights()
    assert rel_err(transformer_out(transformer), trainer) > 1e-3


# --- the names are the real Flux.1-dev checkpoint's ------------------------------------------------


def _flux1_dev_on_meta() -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev), without weights."""
    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            axes_dims_rope=(16, 56, 56),
            guidance_embeds=True,
        )


def test_bfl_names_are_the_flux1_dev_checkpoints() -> None:
    """The BFL names the files use, for every Linear of the real model, are the keys diffusers'
    single-file loader reads from a `flux1-dev.safetensors` (it converts them all, none left)."""
    model = _flux1_dev_on_meta()
    ours = model.state_dict()
    checkpoint = bfl_state_dict(ours)
    assert "double_blocks.18.img_attn.qkv.weight" in checkpoint
    assert tuple(checkpoint["single_blocks.37.linear1.weight"].shape) == (21504, 3072)
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    assert sorted(converted) == sorted(ours)
    for key, tensor in converted.items():
        assert tensor.shape == ours[key].shape, key


def _comfyui_flux_keys() -> tuple[set[str], set[str]]:
    """The LoRA names ComfyUI (comfy/lora.py) and Forge map onto Flux.1-dev's weights:
    `lora_unet_<path with _>` and `diffusion_model.<path>` for each `diffusion_model.<path>.weight`;
    and for CLIP-L `lora_te1_text_model_encoder_layers_<i>_<layer>` and
    `text_encoders.clip_l.transformer.text_model.encoder.layers.<i>.<layer>`."""
    weights = [
        key for key in bfl_state_dict(_flux1_dev_on_meta().state_dict()) if key.endswith(".weight")
    ]
    kohya = {"lora_unet_" + key.removesuffix(".weight").replace(".", "_") for key in weights}
    comfyui = {"diffusion_model." + key.removesuffix(".weight") for key in weights}
    clip_map = {
        "mlp.fc1": "mlp_fc1",
        "mlp.fc2": "mlp_fc2",
        "self_attn.k_proj": "self_attn_k_proj",
        "self_attn.q_proj": "self_attn_q_proj",
        "self_attn.v_proj": "self_attn_v_proj",
        "self_attn.out_proj": "self_attn_out_proj",
    }
    for block in range(12):
        for layer, kohya_layer in clip_map.items():
            kohya.add(f"lora_te1_text_model_encoder_layers_{block}_{kohya_layer}")
            comfyui.add(
                f"text_encoders.clip_l.transformer.text_model.encoder.layers.{block}.{layer}"
            )
    return kohya, comfyui


@pytest.mark.parametrize("preset", PRESETS)
def test_kohya_and_comfyui_names_load_in_comfyui_with_nothing_left_over(preset: str) -> None:
    model = _flux1_dev_on_meta()
    clip_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    )
    with torch.device("meta"):
        clip = CLIPTextModel(clip_config)
        network = make_network(
            {"transformer": model, "text_encoder": clip}, preset=preset, rank=1, seed=None
        )
    kohya, comfyui = _comfyui_flux_keys()
    for layout, known in ((KOHYA_FLUX, kohya), (COMFYUI_FLUX, comfyui)):
        stems = set(layout.layers(network))
        assert stems <= known, sorted(stems - known)[:5]
        assert len([s for s in stems if "clip_l" in s or "lora_te1" in s]) == 72
    if preset == "full":  # every Linear of Flux.1-dev, each once
        linear_weights = {s for s in kohya if s.startswith("lora_unet_")}
        assert {
            s for s in KOHYA_FLUX.layers(network) if s.startswith("lora_unet_")
        } == linear_weights
        assert len(linear_weights) == 19 * 10 + 38 * 3 + 10


def test_the_presets_cover_what_their_names_say(flux_pipe: FluxPipeline, flux_network_on) -> None:
    transformer = [
        path for path, m in flux_pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    paths, clip = {}, {}
    for preset in PRESETS:
        network = flux_network_on(preset=preset)
        for part, found in (("transformer", paths), ("text_encoder", clip)):
            found[preset] = {
                network.module_path[name]
                for name in network.adapters
                if network.part_of[name] == part
            }
    assert paths["full"] == set(transformer)  # every Linear
    assert paths["attn"] < paths["attn-mlp"] < paths["full"]
    assert "single_transformer_blocks.0.attn.to_q" in paths["attn"]
    assert "transformer_blocks.1.attn.to_add_out" in paths["attn"]
    assert not any("ff" in path or "proj_mlp" in path or "norm" in path for path in paths["attn"])
    mlp = paths["attn-mlp"] - paths["attn"]
    assert {"transformer_blocks.0.ff.net.2", "single_transformer_blocks.1.proj_out"} <= mlp
    assert not any("norm" in path for path in paths["attn-mlp"])
    rest = paths["full"] - paths["attn-mlp"]
    assert {"x_embedder", "norm_out.linear", "transformer_blocks.0.norm1_context.linear"} <= rest
    assert set(TRANSFORMER_LAYER_PRESETS) == set(PRESETS)
    # CLIP-L takes its attention and MLP layers whatever the preset: 6 in each of its 2 layers
    layers = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
    layers |= {"mlp.fc1", "mlp.fc2"}
    expected = {f"encoder.layers.{index}.{layer}" for index in range(2) for layer in layers}
    assert all(found == expected for found in clip.values()), clip["attn"]


def test_metadata_names_the_flux_architecture(flux_network_on, tmp_path: Path) -> None:

    family = get_family("flux")
    meta = build_metadata(
        config_json="{}",
        rank=4,
        alpha=2.0,
        title="t",
        resolution=1024,
        base_model_version=family.identity.base_model_version,
        architecture=family.identity.architecture,
    )
    file = tmp_path / "lora.safetensors"
    save_lora(flux_network_on(preset="attn"), file, layout="kohya", metadata=meta)
    read = read_lora_metadata(file)
    assert read["ss_base_model_version"] == "flux1"
    assert read["modelspec.architecture"] == "flux-1-dev/lora"
