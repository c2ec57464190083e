"""Flux LoRA networks with random factors on the tiny Flux, and the outputs the file tests
compare (used by test_flux_lora_files.py and test_flux_lora_reading.py through conftest)."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextModel

from modules.lora.network import LoRANetwork
from modules.models.flux.flow import image_ids, text_ids
from modules.models.flux.layers import flux_lora_targets
from modules.models.flux.lora_layouts import FLUX_LORA_LAYOUTS

PRESETS = ["attn", "attn-mlp", "full"]
BOTH_PARTS = ("transformer", "text_encoder")


def make_network(
    modules: dict[str, torch.nn.Module],
    *,
    preset: str = "full",
    patterns: list[str] | None = None,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int | None = 0,
) -> LoRANetwork:
    """A LoRA network on `modules` (parts by name), with random non-zero A and B (`seed` None:
    as initialised, for models on the meta device)."""
    targets = flux_lora_targets(
        modules=modules,
        train_parts=set(modules),
        layer_preset=preset,
        layer_patterns=patterns or [],
    )
    network = LoRANetwork.inject(
        targets, rank=rank, alpha=alpha, dropout=0.0, layouts=FLUX_LORA_LAYOUTS
    )
    if seed is None:
        return network
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for weight in (adapter.lora_down.weight, adapter.lora_up.weight):
                weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
    return network


def transformer_out(transformer: FluxTransformer2DModel) -> torch.Tensor:
    """The transformer's velocity for fixed inputs: 8x8 latents (16 tokens), 8 text tokens."""
    config = transformer.config
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 16, config.in_channels, generator=generator)
    text = torch.randn(1, 8, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return transformer(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.tensor([0.6]),
            img_ids=image_ids(8, 8),
            txt_ids=text_ids(8),
            guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
            return_dict=False,
        )[0]


def clip_out(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 200, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = text_encoder(ids)
    return {"pooled": out.pooler_output, "last": out.last_hidden_state}


def outputs(pipe) -> dict[str, torch.Tensor]:
    """The transformer's and CLIP-L's outputs for fixed inputs."""
    return {"transformer": transformer_out(pipe.transformer), **clip_out(pipe.text_encoder)}
