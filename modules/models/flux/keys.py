"""Flux transformer module paths in diffusers' names and in BFL's original ones.

BFL's checkpoint (what ComfyUI, Forge and sd-scripts use) fuses some of diffusers' Linear layers
into one: a double block's image q/k/v into `img_attn.qkv` and its text q/k/v into
`txt_attn.qkv`, a single block's q/k/v and MLP input into `linear1`. Each fused layer's output is
its members' outputs stacked in order, every member reading the same input; the q/k/v members are
as wide as that input and the MLP input four times as wide (Flux.1's MLP ratio). The final
modulation (`norm_out.linear`) has its two output halves (shift, scale) swapped against
diffusers' (scale, shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class BFLLayer:
    """Where a diffusers module sits in BFL's naming."""

    path: str  # BFL module path: "double_blocks.0.img_attn.qkv"
    member: int  # its place among the fused layer's members (0 when not fused)
    members: tuple[str, ...]  # the diffusers paths of all members, in output order
    widths: tuple[int, ...]  # each member's output width, in multiples of the shared input width
    swap_halves: bool = False  # output rows are (shift, scale) in BFL, (scale, shift) in diffusers

    @property
    def fused(self) -> bool:
        return len(self.members) > 1


_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, 4)),
}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _block_layer(kind: str, index: str, rest: str) -> BFLLayer | None:
    double = kind == "transformer_blocks"
    plain, fused = (_DOUBLE, _DOUBLE_FUSED) if double else (_SINGLE, _SINGLE_FUSED)
    prefix = f"{'double' if double else 'single'}_blocks.{index}."
    if rest in plain:
        return BFLLayer(path=prefix + plain[rest], member=0, members=(rest,), widths=(1,))
    for name, (members, widths) in fused.items():
        if rest in members:
            return BFLLayer(
                path=prefix + name,
                member=members.index(rest),
                members=tuple(f"{kind}.{index}.{m}" for m in members),
                widths=widths,
            )
    return None


def bfl_layer(path: str) -> BFLLayer | None:
    """The BFL layer of diffusers transformer module `path`; None for a module BFL lacks."""
    block = _BLOCK.match(path)
    if block:
        layer = _block_layer(*block.groups())
        if layer is not None and not layer.fused:  # members name the full diffusers path
            return BFLLayer(path=layer.path, member=0, members=(path,), widths=(1,))
        return layer
    if path in _TOP:
        return BFLLayer(path=_TOP[path], member=0, members=(path,), widths=(1,))
    if path in _SWAPPED:
        return BFLLayer(
            path=_SWAPPED[path], member=0, members=(path,), widths=(1,), swap_halves=True
        )
    return None
