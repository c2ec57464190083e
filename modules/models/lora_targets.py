"""Where LoRA goes in a base model: the denoiser's layers by preset or pattern, and the text
encoders' (CLIP) layers as kohya names them; shared by the families, which pass their parts and
their denoiser's presets."""

from __future__ import annotations

from torch import nn

from modules.config.model_base import PartSpec
from modules.lora.network import LoRATarget
from modules.models.clip_layers import TEXT_ENCODER_PATTERNS, clip_kohya_path


def lora_targets(
    *,
    parts: list[PartSpec],
    modules: dict[str, nn.Module],
    train_parts: set[str],
    denoiser_patterns: list[str],
) -> list[tuple[LoRATarget, list[str]]]:
    """The (target, patterns) list for LoRANetwork.inject, one per trained part in `parts`
    order: `modules` are the parts by name; text encoders are CLIP models."""
    targets = []
    for spec in parts:
        if spec.name not in train_parts:
            continue
        if spec.text_encoder:
            target = LoRATarget(
                part=spec.name,
                kohya_prefix=spec.kohya_prefix,
                model=modules[spec.name],
                kohya_path=clip_kohya_path,
            )
            targets.append((target, TEXT_ENCODER_PATTERNS))
        else:
            target = LoRATarget(
                part=spec.name, kohya_prefix=spec.kohya_prefix, model=modules[spec.name]
            )
            targets.append((target, denoiser_patterns))
    return targets
