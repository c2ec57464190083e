"""How Flux.1 fits a consumer card: its transformer quantized and / or its blocks offloaded (as
`model.quantize_base` and `model.offload_blocks` ask), and its memory profile for the estimate."""

from __future__ import annotations

import logging

import torch
from torch import nn

from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.models.base import MemoryProfile, WeightGroup
from modules.models.flux.layers import flux_lora_targets
from modules.models.meta import meta_copy
from modules.models.offload import BlockOffloader, spread
from modules.models.quantize import quantize_frozen_linears
from modules.util.dtypes import DTYPES

log = logging.getLogger(__name__)

# Left in the transformer's dtype when it is quantized: the input embedders (image, text,
# timestep, guidance, pooled text) and the final modulation and projection, which every token's
# prediction passes through once (under 2% of the weights), as OneTrainer and SimpleTuner keep them.
KEEP_PRECISE = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The blocks in the order the forward pass runs them: the double, then the single blocks."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def offloaded_indices(transformer: nn.Module, count: int) -> list[int]:
    total = len(transformer_blocks(transformer))
    if count > total:
        raise UserError(
            f"model.offload_blocks={count}: this transformer has {total} blocks; "
            f"set it to {total} or fewer"
        )
    return spread(count, total)


def compute_device() -> torch.device:
    """Where this process trains (accelerate has set the current CUDA device by now)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def apply_memory_settings(transformer: nn.Module, config: TrainConfig) -> BlockOffloader | None:
    """Quantize the frozen transformer and offload its blocks as the config asks, before LoRA is
    attached. Quantizing runs layer by layer on the GPU when there is one."""
    settings = config.model
    if settings.quantize_base != "none":
        report = quantize_frozen_linears(
            transformer, settings.quantize_base, keep=KEEP_PRECISE, work_device=compute_device()
        )
        log.info(report.line("transformer"))
    if not settings.offload_blocks:
        return None
    if not config.training.gradient_checkpointing:
        raise UserError(
            f"model.offload_blocks={settings.offload_blocks} needs "
            "training.gradient_checkpointing=true: without it the backward pass keeps every "
            "block's weights on the GPU anyway"
        )
    offloader = BlockOffloader(
        transformer_blocks(transformer), offloaded_indices(transformer, settings.offload_blocks)
    )
    log.info(
        "transformer: %d of %d blocks in CPU memory (%.2f GiB), streamed to the GPU as they run",
        len(offloader.offloaded),
        len(offloader.blocks),
        offloader.offloaded_bytes / 2**30,
    )
    return offloader


def memory_profile(model: nn.Module, config: TrainConfig) -> MemoryProfile:
    """Meta copies of the transformer (quantized and offloaded as configured), CLIP-L, T5 and the
    VAE, with the transformer's inputs at a size and LoRA where the run puts it."""
    settings = config.model
    parts = settings.parts()
    copies = {name: meta_copy(getattr(model, name)) for name in (*parts, "vae")}
    transformer, vae = copies["transformer"], copies["vae"]
    blocks = transformer_blocks(transformer)
    offloaded = spread(min(settings.offload_blocks, len(blocks)), len(blocks))
    quantized = settings.quantize_base != "none"
    specs = {spec.name: spec for spec in settings.part_specs()}
    groups = [
        WeightGroup(
            name="transformer",
            label=specs["transformer"].label,
            module=transformer,
            role="denoiser",
            dtype=DTYPES[parts["transformer"].weight_dtype],
            quantize=settings.quantize_base,
            keep_precise=KEEP_PRECISE if quantized else (),
            offloaded_blocks=tuple(blocks[i] for i in offloaded),
            inputs=_transformer_inputs(
                transformer,
                downscale=2 * 2 ** (len(vae.config.block_out_channels) - 1),
                text_tokens=settings.t5_max_length,
            ),
        ),
        WeightGroup(
            name="text_encoder",
            label=specs["text_encoder"].label,
            module=copies["text_encoder"],
            role="text_encoder",
            dtype=DTYPES[parts["text_encoder"].weight_dtype],
            inputs=_clip_inputs,
        ),
        WeightGroup(
            name="text_encoder_2",
            label=specs["text_encoder_2"].label,
            module=copies["text_encoder_2"],
            role="text_encoder",
            dtype=DTYPES[parts["text_encoder_2"].weight_dtype],
        ),
        WeightGroup("vae", "VAE", vae, "latent_encoder", torch.float32),
    ]
    targets = flux_lora_targets(
        modules={part: copies[part] for part in parts},
        train_parts=set(settings.trained_parts()),
        layer_preset=config.lora.layer_preset,
        layer_patterns=config.lora.layer_patterns,
    )
    return MemoryProfile(
        groups=groups,
        lora_targets=targets,
        savings_hint="quantize the transformer (model.quantize_base nf4 quarters it) or offload "
        "its blocks (model.offload_blocks)",
    )


def _transformer_inputs(transformer: nn.Module, *, downscale: int, text_tokens: int):
    """Packed latents (2x2 patches of the 8x-downscaled image), T5 states, the pooled CLIP
    embedding, timestep, guidance and the position ids, as the training loss feeds them."""
    config = transformer.config

    def inputs(batch: int, height: int, width: int) -> dict:
        tokens = (height // downscale) * (width // downscale)
        with torch.device("meta"):
            return {
                "hidden_states": torch.empty(batch, tokens, config.in_channels),
                "encoder_hidden_states": torch.empty(
                    batch, text_tokens, config.joint_attention_dim
                ),
                "pooled_projections": torch.empty(batch, config.pooled_projection_dim),
                "timestep": torch.empty(batch),
                "img_ids": torch.empty(tokens, 3),
                "txt_ids": torch.empty(text_tokens, 3),
                "guidance": torch.empty(batch) if config.guidance_embeds else None,
            }

    return inputs


def _clip_inputs(batch: int, height: int, width: int) -> dict:
    with torch.device("meta"):
        return {"input_ids": torch.zeros(batch, 77, dtype=torch.long)}
