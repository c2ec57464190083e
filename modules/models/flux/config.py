"""The `model` section of a Flux.1 run: its parts and its flow-matching options."""

from __future__ import annotations

from typing import ClassVar, Literal

from modules.config.fields import option
from modules.config.model_base import FamilyModelConfig, ModelPartConfig, model_part


class FluxModelConfig(FamilyModelConfig):
    """Flux.1 [dev] or [schnell] (read from the transformer's config: dev embeds guidance)."""

    # BFL names (kohya's and ComfyUI's own) and diffusers/PEFT; modules/models/flux/lora_layouts.py
    lora_formats: ClassVar[tuple[str, ...]] = ("kohya", "comfyui", "diffusers")

    family: Literal["flux"] = option(
        "flux", help="Model family of the base model.", tab="model", label="Model family"
    )
    transformer: ModelPartConfig = model_part(
        label="Transformer",
        kohya_prefix="lora_transformer",
        train=True,
        weight_dtype="bfloat16",
        help="The denoising transformer (19 double and 38 single blocks in Flux.1).",
    )
    text_encoder: ModelPartConfig = model_part(
        label="CLIP-L text encoder",
        kohya_prefix="lora_te1",
        train=False,
        text_encoder=True,
        weight_dtype="bfloat16",
        help="CLIP ViT-L, which gives the pooled text embedding.",
    )
    text_encoder_2: ModelPartConfig = model_part(
        label="T5-XXL text encoder",
        kohya_prefix="lora_te3",  # as sd-scripts names Flux's T5 (CLIP-L is lora_te1)
        train=False,
        text_encoder=True,
        trainable=False,
        weight_dtype="bfloat16",
        help="T5-XXL, which gives the token embeddings; always frozen, and with cached text "
        "embeddings it leaves memory before training starts.",
    )
    guidance: float = option(
        1.0,
        help="Guidance value fed to a guidance-distilled model ([dev]) while training. 1.0 is "
        "what kohya's sd-scripts Flux LoRA examples train with: the LoRA learns the images, "
        "not a guidance strength, and samples well at the usual 3-4. Ignored by [schnell].",
        tab="model",
        label="Training guidance",
        ge=0,
        le=100,
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "logit_normal",
        help="How noise levels are drawn: logit_normal concentrates on the middle of the "
        "schedule (SD3 and Flux training), uniform spreads evenly.",
        tab="model",
        label="Timestep sampling",
    )
    logit_mean: float = option(
        0.0,
        help="Mean of the logit-normal timestep distribution.",
        tab="model",
        label="Logit mean",
        advanced=True,
        ge=-10,
        le=10,
    )
    logit_std: float = option(
        1.0,
        help="Standard deviation of the logit-normal timestep distribution.",
        tab="model",
        label="Logit std",
        advanced=True,
        gt=0,
        le=10,
    )
    timestep_shift: Literal["none", "fixed", "resolution"] = option(
        "resolution",
        help="Shift of the sampled noise levels towards noisier ones: resolution = as the base "
        "model's scheduler samples (by image size for [dev], between its base and max shift; "
        "none for [schnell]); fixed = by `shift`; none = as drawn.",
        tab="model",
        label="Timestep shift",
    )
    shift: float = option(
        3.0,
        help="The fixed shift s (sigma' = s sigma / (1 + (s - 1) sigma)) when timestep_shift is "
        "fixed.",
        tab="model",
        label="Shift",
        advanced=True,
        gt=0,
        le=100,
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none",
        help="Per-timestep loss weighting of the flow-matching loss (SD3's schemes); none "
        "weighs every noise level the same.",
        tab="model",
        label="Loss weighting",
        advanced=True,
    )
    t5_max_length: int = option(
        512,
        help="Tokens of the T5 prompt encoding: 512 for [dev], 256 for [schnell]. Shorter is "
        "faster and lighter; longer captions are cut.",
        tab="model",
        label="T5 max length",
        ge=1,
        le=512,
    )
    quantize_base: Literal["none", "int8", "fp8", "nf4"] = option(
        "none",
        help="Quantize the frozen transformer's weights (LoRA stays in its own dtype on top): "
        "int8 and fp8 (torchao, weight-only) about halve its memory, nf4 (bitsandbytes) "
        "quarters it. See docs/benchmarks.md for measured memory.",
        tab="model",
        label="Quantize base",
    )
    offload_blocks: int = option(
        0,
        help="Keep this many of the transformer's blocks in CPU memory and stream each to the "
        "GPU when it runs (for 8-12 GB cards); 0 keeps all on the GPU. Slower per step.",
        tab="model",
        label="Offload blocks",
        advanced=True,
        ge=0,
        le=57,
    )
