"""Test models and networks for the interoperability tests.

`build_sdxl_topology` writes a diffusers folder whose UNet has SDXL's block layout (three levels,
two layers per down block, attention in the two deeper levels, an upsampler after attention)
with tiny widths: A1111 and sd-scripts hard-code that layout, so their key mapping can only be
reproduced faithfully on it. `sgm_module` names each of our layers as the original checkpoint
does, through `tests/sgm_checkpoint.py` (the inverse of diffusers' single-file converter, checked
against it in test_single_file.py), independently of the names our files write.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from modules.lora.layouts import LoRALayout
from modules.lora.network import LoRANetwork
from modules.models.sdxl.keys import sdxl_lora_layouts
from modules.models.sdxl.layers import sdxl_lora_targets
from tests import sgm_checkpoint

ALL_PARTS = {"unet", "text_encoder", "text_encoder_2"}
_OPEN_CLIP = {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def build_sdxl_topology(tiny_folder: Path, out: Path) -> Path:
    """The tiny model's folder with a UNet shaped like SDXL's (blocks, layers, attention)."""
    shutil.copytree(tiny_folder, out, ignore=shutil.ignore_patterns("unet"))
    cross = UNet2DConditionModel.load_config(tiny_folder / "unet")["cross_attention_dim"]
    add_dim = UNet2DConditionModel.load_config(tiny_folder / "unet")[
        "projection_class_embeddings_input_dim"
    ]
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
        attention_head_dim=(2, 2, 4),
        norm_num_groups=8,
        cross_attention_dim=cross,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=add_dim,
    )
    unet.save_pretrained(out / "unet")
    return out


def make_network(
    pipe: StableDiffusionXLPipeline,
    *,
    preset: str,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    parts: set[str] = ALL_PARTS,
    layouts: tuple[LoRALayout, ...] | None = None,
) -> LoRANetwork:
    """A network on `parts` of `pipe` with random non-zero A and B (SDXL's layouts unless
    `layouts` is given)."""
    targets = sdxl_lora_targets(
        modules={part: getattr(pipe, part) for part in parts},
        train_parts=parts,
        layer_preset=preset,
        layer_patterns=[],
    )
    network = LoRANetwork.inject(
        targets,
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        layouts=sdxl_lora_layouts(pipe.unet.config) if layouts is None else layouts,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for weight in (adapter.lora_down.weight, adapter.lora_up.weight):
                weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
    return network


def sgm_modules_of(
    network: LoRANetwork, unet: UNet2DConditionModel
) -> dict[str, tuple[str, int | None]]:
    """Adapter name -> the original checkpoint's module for it (with the checkpoint's prefix),
    and which third of OpenCLIP's fused q/k/v projection it is (None: the whole module)."""
    keys = list(unet.state_dict())
    converted = sgm_checkpoint._unet(dict.fromkeys(keys), dict(unet.config))
    unet_names = {
        key.removesuffix(".weight"): sgm.removesuffix(".weight")
        for key, sgm in zip(keys, converted, strict=True)
    }
    modules = {}
    for name, part in network.part_of.items():
        path = network.module_path[name]
        inner = path.removeprefix("text_model.")
        if part == "unet":
            modules[name] = unet_names[path], None
        elif part == "text_encoder":
            modules[name] = f"{sgm_checkpoint.CLIP_L_PREFIX}text_model.{inner}", None
        else:
            layer, _, projection = inner.removeprefix("encoder.layers.").partition(".")
            block = f"{sgm_checkpoint.OPEN_CLIP_PREFIX}transformer.resblocks.{layer}"
            qkv = projection.removeprefix("self_attn.").removesuffix("_proj")
            if qkv in ("q", "k", "v"):
                modules[name] = f"{block}.attn", "qkv".index(qkv)
            else:
                modules[name] = f"{block}.{_OPEN_CLIP[projection]}", None
    return modules
