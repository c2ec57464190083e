"""Build a tiny, randomly initialised Flux.1-shaped base model as a diffusers folder.

The tests use it so nothing is downloaded: the folder has the layout of
`black-forest-labs/FLUX.1-dev` (transformer, 16-channel VAE with shift and scaling, CLIP-L, T5,
their tokenizers, the flow-matching scheduler) and goes through the same loader a user's model
does. With `guidance_embeds=False` it is shaped like [schnell].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from modules.models.tiny_text import (
    byte_level_clip_tokenizer,
    character_t5_tokenizer,
    clip_text_config,
    t5_encoder_config,
)

CLIP_HIDDEN = 32  # CLIP-L's place (768 in Flux.1); its pooled output is the transformer's vector
T5_WIDTH = 32  # T5-XXL's place (4096)
LATENT_CHANNELS = 16  # as Flux.1's VAE: packed 2x2, the transformer sees 64 channels
HEAD_DIM = 16  # 128 in Flux.1; the rotary axes split it as (16, 56, 56) does 128
AXES_DIMS_ROPE = (4, 6, 6)
HEADS = 4  # 24 in Flux.1

# Flux.1's VAE normalisation (its config's shift_factor and scaling_factor)
VAE_SHIFT, VAE_SCALE = 0.1159, 0.3611


def tiny_transformer_config(*, guidance_embeds: bool = True) -> dict:
    """A Flux transformer of two double and two single blocks, 64 wide: as wide as its
    64-channel packed output, so a LoRA can fit any target (the one-batch overfit tests)."""
    return {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": HEADS,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": CLIP_HIDDEN,
        "axes_dims_rope": AXES_DIMS_ROPE,
        "guidance_embeds": guidance_embeds,
    }


def scheduler_for(*, guidance_embeds: bool) -> FlowMatchEulerDiscreteScheduler:
    """[dev]'s resolution-dependent shift, or [schnell]'s unshifted schedule."""
    if guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def factor4_vae(
    *, scaling_factor: float, shift_factor: float, latent_channels: int = LATENT_CHANNELS
) -> AutoencoderKL:
    """Flux.1's VAE (16 channels unless told otherwise) with three blocks instead of four: a
    factor of 4, so a 64 px image is 16 x 16 latents and 8 x 8 packed tokens (the tiny test
    model's and the world's)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_tiny_flux(path: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny Flux diffusers folder; `guidance_embeds=False` makes it [schnell]-shaped."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(
        clip_text_config(
            vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, projection_dim=CLIP_HIDDEN
        )
    )
    tokenizer_2 = character_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        t5_encoder_config(vocab_size=len(tokenizer_2), d_model=T5_WIDTH)
    )
    transformer = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds=guidance_embeds))
    vae = factor4_vae(scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT)
    path.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(path / "transformer")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    text_encoder_2.save_pretrained(path / "text_encoder_2")
    tokenizer.save_pretrained(path / "tokenizer")
    tokenizer_2.save_pretrained(path / "tokenizer_2")
    scheduler_for(guidance_embeds=guidance_embeds).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(FLUX_MODEL_INDEX, indent=2) + "\n")
    return path


FLUX_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
