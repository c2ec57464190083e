"""The tiny Flux transformer on its own (the family's test config), its inputs and LoRA on all of
its blocks, for the quantization, offloading and memory tests."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from modules.lora.network import LoRANetwork, LoRATarget
from modules.models.flux.tiny import tiny_transformer_config

TINY_FLUX = tiny_transformer_config()


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FLUX)
    if dtype != torch.float32:
        model.to(dtype)
    model.requires_grad_(False)
    return model


def flux_inputs(seed: int = 1, *, batch: int = 2, side: int = 4, text: int = 5) -> dict:
    """Packed latents of a `side` x `side` token image, text embeddings and ids."""
    generator = torch.Generator().manual_seed(seed)
    tokens = side * side
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(batch, tokens, TINY_FLUX["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(
            batch, text, TINY_FLUX["joint_attention_dim"], generator=generator
        ),
        "pooled_projections": torch.randn(
            batch, TINY_FLUX["pooled_projection_dim"], generator=generator
        ),
        "timestep": torch.rand(batch, generator=generator),
        "img_ids": img_ids.reshape(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 1.0),
    }


def run(model: FluxTransformer2DModel, inputs: dict) -> torch.Tensor:
    dtype = next(model.x_embedder.parameters()).dtype
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model(**cast).sample.float()


def lora_on_blocks(model: FluxTransformer2DModel, *, rank: int = 4, seed: int = 3) -> LoRANetwork:
    """LoRA on every Linear of every block (LoRA's B starts random so gradients reach A too)."""
    torch.manual_seed(seed)
    network = LoRANetwork.inject(
        [
            (
                LoRATarget(part="transformer", kohya_prefix="lora_transformer", model=model),
                ["re:^(single_)?transformer_blocks\\."],
            )
        ],
        rank=rank,
        alpha=rank,
        dropout=0.0,
    )
    for adapter in network.adapters.values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.02)
    return network
