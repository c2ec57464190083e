"""How LoRA files name SDXL's layers, and the layouts Geodesic writes and reads for SDXL.

sd-scripts, ai-toolkit and OneTrainer's OMI files name SDXL UNet layers after the original
Stability checkpoint (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), and sd-scripts only
finds a UNet layer under that name (`--network_weights`, `sdxl_merge_lora.py`); diffusers calls
the same layer `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. The map is built
from the UNet's config (block types, layers per block), as the original model numbers its blocks,
so it holds for SDXL and for a tiny test UNet alike:

- `input_blocks.0.0` is conv_in; then, per down block, one input block per layer (its ResNet at
  `.0`, its transformer at `.1`) and one more for the downsampler (`.0.op`);
- `middle_block.0/1/2` are the mid block's ResNet, transformer, ResNet;
- per up block, layers + 1 output blocks (ResNet `.0`, transformer `.1`); the upsampler sits in
  the last one, after the transformer when the block has one (`.2.conv`, else `.1.conv`);
- inside a ResNet, diffusers' conv1 / conv2 / time_emb_proj / conv_shortcut are
  in_layers.2 / out_layers.3 / emb_layers.1 / skip_connection; transformers keep their names.

Our kohya files write these names (what A1111, Forge, ComfyUI, diffusers and sd-scripts all
read), and read every spelling other SDXL trainers write: sd-scripts / ai-toolkit (SGM names),
OneTrainer's default files (kohya keys with diffusers paths) and its OMI files (`unet.<SGM
path>`, `clip_l.` / `clip_g.`), and diffusers' training scripts (PEFT keys, or the
`.lora.down.weight` / `.lora_linear_layer.down.weight` keys of older diffusers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType

from modules.lora.layouts import KohyaLayout, LoRALayout, NamedLayers, PeftLayout
from modules.models.sdxl.config import SDXLModelConfig

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_OUTSIDE_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# a block member: a ResNet, a transformer or a resampler, and the path inside it
_DIFFUSERS_MEMBER = re.compile(
    r"((?:down_blocks|up_blocks)\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:resnets|attentions)\.\d+)(?:\.(.+))?"
)
_SGM_MEMBER = re.compile(r"((?:input_blocks|output_blocks)\.\d+\.\d+|middle_block\.\d+)(?:\.(.+))?")


@dataclass(frozen=True)
class _Member:
    diffusers: str  # "down_blocks.1.resnets.0"
    sgm: str  # "input_blocks.4.0"
    inner: Mapping[str, str] | None  # diffusers -> SGM names inside it; None: the same names


@dataclass(frozen=True)
class UNetPaths:
    """Module paths of one UNet, diffusers <-> SGM; None for a path the map does not know."""

    by_diffusers: Mapping[str, _Member]  # block member, e.g. "down_blocks.1.resnets.0"
    by_sgm: Mapping[str, _Member]  # the same members, e.g. "input_blocks.4.0"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetPaths:
        """From a diffusers `UNet2DConditionModel.config` (or its dict)."""
        down_types = list(config["down_block_types"])
        up_types = list(config["up_block_types"])
        layers = config["layers_per_block"]
        layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
        members: list[_Member] = []

        index = 1  # input_blocks.0 is conv_in
        for block, block_type in enumerate(down_types):
            for layer in range(layers[block]):
                members += _resnet_and_attention(
                    f"down_blocks.{block}", layer, f"input_blocks.{index}", block_type
                )
                index += 1
            if block < len(down_types) - 1:  # every down block but the last halves the size
                conv = {"conv": "op"}
                members.append(
                    _Member(f"down_blocks.{block}.downsamplers.0", f"input_blocks.{index}.0", conv)
                )
                index += 1

        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
            members.append(_Member("mid_block.resnets.0", "middle_block.0", _RESNET))
            members.append(_Member("mid_block.attentions.0", "middle_block.1", None))
            members.append(_Member("mid_block.resnets.1", "middle_block.2", _RESNET))

        index = 0
        for block, block_type in enumerate(up_types):
            count = list(reversed(layers))[block] + 1
            for layer in range(count):
                members += _resnet_and_attention(
                    f"up_blocks.{block}", layer, f"output_blocks.{index}", block_type
                )
                if layer == count - 1 and block < len(up_types) - 1:
                    slot = 2 if "CrossAttn" in block_type else 1
                    members.append(
                        _Member(
                            f"up_blocks.{block}.upsamplers.0",
                            f"output_blocks.{index}.{slot}",
                            {"conv": "conv"},
                        )
                    )
                index += 1
        return cls(
            by_diffusers={m.diffusers: m for m in members},
            by_sgm={m.sgm: m for m in members},
        )

    def to_sgm(self, path: str) -> str | None:
        """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`."""
        if path in _OUTSIDE_BLOCKS:
            return _OUTSIDE_BLOCKS[path]
        match = _DIFFUSERS_MEMBER.fullmatch(path)
        member = self.by_diffusers.get(match[1]) if match else None
        if member is None:
            return None
        inside = _rename(match[2], member.inner)
        return None if inside is None else _join(member.sgm, inside)

    def to_diffusers(self, path: str) -> str | None:
        """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in`."""
        for diffusers, sgm in _OUTSIDE_BLOCKS.items():
            if path == sgm:
                return diffusers
        match = _SGM_MEMBER.fullmatch(path)
        member = self.by_sgm.get(match[1]) if match else None
        if member is None:
            return None
        inverse = None if member.inner is None else {v: k for k, v in member.inner.items()}
        inside = _rename(match[2], inverse)
        return None if inside is None else _join(member.diffusers, inside)


def _resnet_and_attention(block: str, layer: int, sgm: str, block_type: str) -> list[_Member]:
    members = [_Member(f"{block}.resnets.{layer}", f"{sgm}.0", _RESNET)]
    if "CrossAttn" in block_type:
        members.append(_Member(f"{block}.attentions.{layer}", f"{sgm}.1", None))
    return members


def _rename(inside: str | None, names: Mapping[str, str] | None) -> str | None:
    """The path inside a block member under the other naming ('' for the member itself)."""
    if inside is None:
        return ""
    if names is None:
        return inside
    return names.get(inside)


def _join(prefix: str, inside: str) -> str:
    return f"{prefix}.{inside}" if inside else prefix


# OneTrainer's OMI files name SDXL's parts after the original model's components
_OMI_PART = {"unet": "unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_KOHYA_PREFIX = {spec.name: spec.kohya_prefix for spec in SDXLModelConfig.part_specs()}
# keys of diffusers' pre-PEFT LoRA files (UNet) and of their text-encoder LoRA
_LEGACY_UNET = (".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.")
_LEGACY_TEXT = {  # marker -> the diffusers format diffusers' converter calls it
    "lora_linear_layer.": StateDictType.DIFFUSERS,
    "_lora.down.": StateDictType.DIFFUSERS_OLD,
    "_lora.up.": StateDictType.DIFFUSERS_OLD,
}


def sdxl_lora_layouts(unet_config: Mapping[str, Any]) -> tuple[LoRALayout, ...]:
    """kohya (written with SGM UNet names) and diffusers/PEFT, for a UNet of this config."""
    unet_paths = UNetPaths.from_config(unet_config)

    def stems(layers: NamedLayers, name: str) -> tuple[str, ...]:
        """Written first: SGM names for the UNet; read too: our older diffusers-path names
        (the adapter's own name, as OneTrainer writes them) and OMI's dotted ones."""
        part, path = layers.part_of[name], layers.export_path[name]
        sgm = unet_paths.to_sgm(path) if part == "unet" else None
        if sgm is None:  # text encoders keep their Hugging Face names in every tool
            return (name, f"{_OMI_PART[part]}.{path}")
        return (f"{_KOHYA_PREFIX[part]}_{sgm.replace('.', '_')}", name, f"{_OMI_PART[part]}.{sgm}")

    return (KohyaLayout(stems), PeftLayout(normalise=legacy_diffusers_to_peft))


def legacy_diffusers_to_peft(state: dict[str, object]) -> dict[str, object]:
    """Keys of diffusers' older LoRA files as PEFT keys, by diffusers' own converters, in order
    (`unet.<path>.lora.down.weight`, attention processors' `.processor.to_q_lora.down.weight`
    with or without the `unet.` prefix, `text_encoder.<path>.lora_linear_layer.down.weight`)."""
    renamed: dict[str, object] = {}
    for key, value in state.items():
        if key.startswith("text_encoder"):
            kind = next((kind for mark, kind in _LEGACY_TEXT.items() if mark in key), None)
            if kind is not None:
                key = next(iter(convert_state_dict_to_peft({key: value}, original_type=kind)))
        elif any(mark in key for mark in _LEGACY_UNET):
            key = next(iter(convert_unet_state_dict_to_peft({key: value})))
            key = key if key.startswith("unet.") else f"unet.{key}"
        renamed[key] = value
    return renamed
