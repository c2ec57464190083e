"""Which SDXL layers get LoRA, and how kohya tools name them."""

from __future__ import annotations

from modules.lora.network import LoRATarget

_ATTENTION = r"re:\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_MLP = r"re:\.ff\.net\.(0\.proj|2)$"
_CONV_AND_PROJ = (
    r"re:(\.proj_in|\.proj_out|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)"
    r"|samplers\.\d+\.conv)$"
)

UNET_LAYER_PRESETS: dict[str, list[str]] = {
    "attn": [_ATTENTION],
    "attn-mlp": [_ATTENTION, _MLP],
    "full": [_ATTENTION, _MLP, _CONV_AND_PROJ],
}

# kohya's default text-encoder LoRA: every attention and MLP projection of the CLIP layers.
TEXT_ENCODER_PATTERNS = [r"re:(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"]

# part name in the config -> kohya key prefix
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def clip_kohya_path(path: str) -> str:
    """kohya keys name CLIP layers from `text_model.` (transformers 5 dropped that wrapper)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def sdxl_lora_targets(
    *,
    unet,
    text_encoder,
    text_encoder_2,
    train_parts: set[str],
    layer_preset: str,
    layer_patterns: list[str],
) -> list[tuple[LoRATarget, list[str]]]:
    """The (target, patterns) list for LoRANetwork.inject from the config's choices."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    targets = []
    for part, model in models.items():
        if part not in train_parts:
            continue
        if part == "unet":
            patterns = layer_patterns or UNET_LAYER_PRESETS[layer_preset]
            target = LoRATarget(part=part, kohya_prefix=KOHYA_PREFIXES[part], model=model)
        else:
            patterns = TEXT_ENCODER_PATTERNS
            target = LoRATarget(
                part=part,
                kohya_prefix=KOHYA_PREFIXES[part],
                model=model,
                kohya_path=clip_kohya_path,
            )
        targets.append((target, patterns))
    return targets
