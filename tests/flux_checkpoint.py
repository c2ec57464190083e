"""A Flux transformer's weights in BFL's original checkpoint layout (what `flux1-dev.safetensors`
and ComfyUI's diffusion-model files hold), built from a diffusers state dict.

The Linear layers go through the trainer's own BFL map (modules/models/flux/keys.py); diffusers'
single-file converter then reads the result back, so the tests check that map against diffusers.
The RMSNorm scales, which carry no LoRA, are named here.
"""

from __future__ import annotations

import re

import torch

from modules.models.flux.keys import bfl_layer

_NORMS = [
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_q\.weight$",
        r"double_blocks.\1.img_attn.norm.query_norm.scale",
    ),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_k\.weight$",
        r"double_blocks.\1.img_attn.norm.key_norm.scale",
    ),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight$",
        r"double_blocks.\1.txt_attn.norm.query_norm.scale",
    ),
    (
        r"^transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight$",
        r"double_blocks.\1.txt_attn.norm.key_norm.scale",
    ),
    (
        r"^single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight$",
        r"single_blocks.\1.norm.query_norm.scale",
    ),
    (
        r"^single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight$",
        r"single_blocks.\1.norm.key_norm.scale",
    ),
]


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_state_dict(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under BFL's names, fused layers concatenated in their members' order."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in diffusers_state.items():
        module, _, kind = key.rpartition(".")
        layer = bfl_layer(module)
        if layer is None:
            names = [
                re.sub(pattern, name, key) for pattern, name in _NORMS if re.match(pattern, key)
            ]
            if len(names) != 1:
                raise KeyError(f"no BFL name for {key}")
            out[names[0]] = tensor
        elif layer.fused:
            fused.setdefault(f"{layer.path}.{kind}", {})[layer.member] = tensor
        else:
            out[f"{layer.path}.{kind}"] = _swap_halves(tensor) if layer.swap_halves else tensor
    for key, members in fused.items():
        out[key] = torch.cat([members[index] for index in sorted(members)])
    return out
