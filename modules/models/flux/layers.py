"""Which Flux transformer layers get LoRA (the presets, named as SDXL's), and on which parts."""

from __future__ import annotations

from torch import nn

from modules.lora.network import LoRATarget
from modules.models.flux.config import FluxModelConfig
from modules.models.lora_targets import lora_targets

# Attention projections: the double blocks' image and text q/k/v and outputs, the single blocks'
# q/k/v (diffusers' Flux DreamBooth LoRA default set)
_ATTENTION = r"re:\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
# The MLPs: the double blocks' image and text feed-forwards, the single blocks' MLP input and
# their output projection (which fuses attention output and MLP output, as BFL's linear2)
_MLP = (
    r"re:(\.ff(_context)?\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))$"
)
# The rest of the transformer: the blocks' modulation (norm1, norm1_context, norm), the input
# embedders (image, text, timestep, pooled text, guidance) and the final modulation and projection
_MODULATION_AND_EMBEDDERS = (
    r"re:(\.norm1(_context)?\.linear|single_transformer_blocks\.\d+\.norm\.linear"
    r"|^(x_embedder|context_embedder|norm_out\.linear|proj_out)"
    r"|^time_text_embed\.\w+\.linear_[12])$"
)

TRANSFORMER_LAYER_PRESETS: dict[str, list[str]] = {
    "attn": [_ATTENTION],
    "attn-mlp": [_ATTENTION, _MLP],
    "full": [_ATTENTION, _MLP, _MODULATION_AND_EMBEDDERS],
}


def flux_lora_targets(
    *,
    modules: dict[str, nn.Module],
    train_parts: set[str],
    layer_preset: str,
    layer_patterns: list[str],
) -> list[tuple[LoRATarget, list[str]]]:
    """The (target, patterns) list for LoRANetwork.inject: `modules` are the parts by name."""
    return lora_targets(
        parts=FluxModelConfig.part_specs(),
        modules=modules,
        train_parts=train_parts,
        denoiser_patterns=layer_patterns or TRANSFORMER_LAYER_PRESETS[layer_preset],
    )
