"""Build a tiny, randomly initialised SDXL-shaped base model as a diffusers folder.

The demo and the tests use it so nothing is downloaded: the folder has the same layout as
`stabilityai/stable-diffusion-xl-base-1.0` and goes through the same loader a user's model does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from modules.models.tiny_text import byte_level_clip_tokenizer, clip_text_config

TEXT_HIDDEN = 32  # CLIP-L's place
# OpenCLIP-G's place: a width of its own, as in SDXL (768 vs 1280), which diffusers' single-file
# loader relies on to tell the two encoders apart
TEXT_HIDDEN_2 = 48
POOLED_DIM = 32
TIME_EMBED_DIM = 8


def build_tiny_sdxl(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL diffusers folder (UNet, 2 CLIP encoders, tokenizers, VAE, scheduler)."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = byte_level_clip_tokenizer()
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(
        clip_text_config(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, projection_dim=POOLED_DIM)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_text_config(
            vocab_size=vocab_size, hidden_size=TEXT_HIDDEN_2, projection_dim=POOLED_DIM
        )
    )
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder.save_pretrained(path / "text_encoder")
    text_encoder_2.save_pretrained(path / "text_encoder_2")
    tokenizer.save_pretrained(path / "tokenizer")
    tokenizer.save_pretrained(path / "tokenizer_2")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(_MODEL_INDEX)
    return path


_MODEL_INDEX = """{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.42.1",
  "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "DDPMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"""
