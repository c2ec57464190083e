"""The CLIP text encoders' LoRA layers and their kohya names, shared by the families using CLIP."""

from __future__ import annotations

# kohya's default text-encoder LoRA: every attention and MLP projection of the CLIP layers.
TEXT_ENCODER_PATTERNS = [r"re:(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"]


def clip_kohya_path(path: str) -> str:
    """kohya keys name CLIP layers from `text_model.` (transformers 5 dropped that wrapper)."""
    return path if path.startswith("text_model.") else f"text_model.{path}"
