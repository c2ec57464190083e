"""The `model` section of an SDXL run: its three parts and its own training options."""

from __future__ import annotations

from typing import Literal

from modules.config.fields import option
from modules.config.model_base import FamilyModelConfig, ModelPartConfig, model_part


class SDXLModelConfig(FamilyModelConfig):
    """Stable Diffusion XL (and models fine-tuned from it: Pony, Illustrious, ...)."""

    family: Literal["sdxl"] = option(
        "sdxl", help="Model family of the base model.", tab="model", label="Model family"
    )
    unet: ModelPartConfig = model_part(
        label="UNet",
        kohya_prefix="lora_unet",
        train=True,
        help="The denoising UNet.",
    )
    text_encoder: ModelPartConfig = model_part(
        label="CLIP-L text encoder",
        kohya_prefix="lora_te1",
        train=False,
        text_encoder=True,
        help="The first text encoder (CLIP ViT-L).",
    )
    text_encoder_2: ModelPartConfig = model_part(
        label="OpenCLIP-G text encoder",
        kohya_prefix="lora_te2",
        train=False,
        text_encoder=True,
        help="The second text encoder (OpenCLIP ViT-bigG), which also gives the pooled embedding.",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = option(
        "auto",
        help="What the model predicts; auto reads the base model's scheduler config.",
        tab="model",
        label="Prediction type",
    )
    min_snr_gamma: float = option(
        0.0,
        help="Min-SNR-gamma loss weighting (5 is common); 0 disables it.",
        tab="model",
        label="Min-SNR gamma",
        ge=0,
    )
