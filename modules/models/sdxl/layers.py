"""Which SDXL layers get LoRA, and how kohya tools name them."""

from __future__ import annotations

from torch import nn

from modules.lora.network import LoRATarget
from modules.models.lora_targets import lora_targets
from modules.models.sdxl.config import SDXLModelConfig

_ATTENTION = r"re:\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# sd-scripts' default SDXL LoRA: every Linear inside the transformer blocks' Transformer2DModel,
# i.e. attention, feed-forward and the blocks' proj_in / proj_out
_MLP_AND_PROJ = r"re:(\.ff\.net\.(0\.proj|2)|attentions\.\d+\.proj_(in|out))$"
# sd-scripts' LoRA with conv_dim (LoCon): the ResNet blocks (convolutions and their time
# projection) and the down/up samplers' convolutions
_RESNETS = r"re:(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|samplers\.\d+\.conv)$"

UNET_LAYER_PRESETS: dict[str, list[str]] = {
    "attn": [_ATTENTION],
    "attn-mlp": [_ATTENTION, _MLP_AND_PROJ],
    "full": [_ATTENTION, _MLP_AND_PROJ, _RESNETS],
}


def sdxl_lora_targets(
    *,
    modules: dict[str, nn.Module],
    train_parts: set[str],
    layer_preset: str,
    layer_patterns: list[str],
) -> list[tuple[LoRATarget, list[str]]]:
    """The (target, patterns) list for LoRANetwork.inject: `modules` are the parts by name."""
    return lora_targets(
        parts=SDXLModelConfig.part_specs(),
        modules=modules,
        train_parts=train_parts,
        denoiser_patterns=layer_patterns or UNET_LAYER_PRESETS[layer_preset],
    )
