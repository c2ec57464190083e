"""Flux LoRA files in BFL's names: kohya's (`lora_unet_double_blocks_0_img_attn_qkv`, which
sd-scripts writes and ComfyUI, Forge and diffusers read) and ComfyUI's own
(`diffusion_model.double_blocks.0.img_attn.qkv`).

The trainer puts one adapter on each of diffusers' Linear layers; where BFL fuses several of them
(q/k/v, and the single blocks' q/k/v + MLP input), their adapters are written as one LoRA on the
fused layer: A stacked, B block-diagonal, and alpha chosen so the scale alpha / rank stays each
adapter's (A and B are the adapters' own numbers, bit for bit). Reading splits a fused LoRA back:
exactly when B is block-diagonal as ours (A's chunks and B's blocks); when it is a plain LoRA on
the fused layer (other trainers) and each adapter has the file's rank, every adapter takes the
whole A and its own rows of B, which is exact as well. The final modulation's output halves swap.

diffusers (0.42) reads these files too, but drops without a word the LoRAs on the embedders and
the final layer (only the `full` preset has them): its converter names them without the
`transformer.` prefix it then loads by. ComfyUI and Forge load them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.errors import UserError
from modules.lora.layers import LoRAModule
from modules.lora.layouts import (
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_UP,
    AdapterWeights,
    DecodedFile,
    KohyaLayout,
    NamedLayers,
    PeftLayout,
    to_file,
)
from modules.lora.network import LoRANetwork
from modules.models.flux.keys import BFLLayer, bfl_layer

_SUFFIXES = (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA)


@dataclass
class _FileLayer:
    """One LoRA of the file: a BFL layer with the adapters on its members, or a text-encoder
    layer with its one adapter."""

    stem: str
    adapters: dict[int, str]  # member index -> adapter name
    bfl: BFLLayer | None  # None: not a transformer layer (CLIP-L)

    def rows(self, width: int) -> list[tuple[int, int]]:
        """(start, size) of each member's output rows in the fused output."""
        widths = self.bfl.widths if self.bfl else (1,)
        starts, start = [], 0
        for multiple in widths:
            starts.append((start, multiple * width))
            start += multiple * width
        return starts


def _swap_halves(rows: torch.Tensor) -> torch.Tensor:
    first, second = rows.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class BFLLayout:
    """A kohya-suffixed layout in BFL's module names; `transformer_stem` and `text_stem` name
    the file's LoRAs (from a BFL module path, and from a CLIP adapter)."""

    def __init__(
        self,
        *,
        name: str,
        transformer_stem: Callable[[str], str],
        text_stem: Callable[[NamedLayers, str], str],
        prefixes: tuple[str, ...],
    ) -> None:
        self.name = name
        self._transformer_stem = transformer_stem
        self._text_stem = text_stem
        self._prefixes = prefixes

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.startswith(self._prefixes) and key.endswith(KOHYA_DOWN) for key in keys)

    def layers(self, network: NamedLayers, *, strict: bool = True) -> dict[str, _FileLayer]:
        """The file's LoRAs for these layers, by stem; a transformer layer BFL has no name for
        is an error when writing (`strict`), and no LoRA of a file when reading."""
        layers: dict[str, _FileLayer] = {}
        for name in network.part_of:
            layer = bfl_layer(network.module_path[name]) if _is_transformer(network, name) else None
            if layer is None:
                if _is_transformer(network, name):
                    if not strict:
                        continue
                    raise UserError(
                        f"LoRA layer {network.module_path[name]!r} has no name in BFL's Flux "
                        "checkpoints; save with output.format diffusers or leave it out of "
                        "lora.layer_patterns"
                    )
                stem = self._text_stem(network, name)
                layers[stem] = _FileLayer(stem=stem, adapters={0: name}, bfl=None)
                continue
            stem = self._transformer_stem(layer.path)
            entry = layers.setdefault(stem, _FileLayer(stem=stem, adapters={}, bfl=layer))
            entry.adapters[layer.member] = name
        return layers

    # -- writing -------------------------------------------------------------------------------

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for stem, layer in self.layers(network).items():
            down, up, alpha = _fuse(layer, network)
            tensors[stem + KOHYA_DOWN] = to_file(down, dtype)
            tensors[stem + KOHYA_UP] = to_file(up, dtype)
            tensors[stem + KOHYA_ALPHA] = to_file(alpha.reshape(()), None)  # always float32
        return tensors

    # -- reading -------------------------------------------------------------------------------

    def decode(
        self,
        layers: NamedLayers,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> DecodedFile:
        file_layers = self.layers(layers, strict=False)
        stems: set[str] = set()  # the file's LoRAs that name a layer
        unknown = []
        for key in sorted(tensors):
            suffix = next((end for end in _SUFFIXES if key.endswith(end)), "")
            if not suffix or key.removesuffix(suffix) not in file_layers:
                unknown.append(key)
                continue
            stems.add(key.removesuffix(suffix))
        decoded: dict[str, AdapterWeights] = {}
        for stem in sorted(stems):
            down_key, up_key = stem + KOHYA_DOWN, stem + KOHYA_UP
            for key in (down_key, up_key):
                if key not in tensors:
                    raise UserError(f"{path}: key {key!r} is missing; the file is cut short")
            down, up = tensors[down_key], tensors[up_key]
            rank = down.shape[0]
            alpha = tensors.get(stem + KOHYA_ALPHA, torch.tensor(float(rank)))
            if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                raise UserError(f"{path}: key {stem + KOHYA_ALPHA!r} should be one finite number")
            layer = file_layers[stem]
            if layer.bfl is not None and layer.bfl.swap_halves:
                up = _swap_halves(up)
            split = _split(layer, layers, down, up, path=path, keys=(down_key, up_key))
            for name, (member_down, member_up) in split.items():
                # the file's scale alpha / rank, kept by each adapter at its own rank
                member_alpha = alpha.reshape(()).float() * member_down.shape[0] / rank
                decoded[name] = AdapterWeights(
                    down=member_down, up=member_up, alpha=member_alpha, keys=(down_key, up_key)
                )
        return DecodedFile(weights=decoded, unknown=unknown)


def _is_transformer(network: NamedLayers, name: str) -> bool:
    return network.part_of[name] == "transformer"


def _fuse(
    layer: _FileLayer, network: LoRANetwork
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LoRA (A, B, alpha) equal to the sum of the layer's adapters."""
    adapters: list[tuple[int, LoRAModule]] = [
        (member, network.adapters[name]) for member, name in sorted(layer.adapters.items())
    ]
    if layer.bfl is None or not layer.bfl.fused:
        adapter = adapters[0][1]
        up = adapter.lora_up.weight.detach()
        if layer.bfl is not None and layer.bfl.swap_halves:
            up = _swap_halves(up)
        return adapter.lora_down.weight.detach(), up, adapter.alpha.detach().float()
    width = adapters[0][1].lora_down.weight.shape[1]
    rows = layer.rows(width)
    total_rank = sum(adapter.rank for _, adapter in adapters)
    scale = adapters[0][1].scale  # the fused LoRA's scale; other adapters' B make up the rest
    first = adapters[0][1].lora_up.weight
    up = torch.zeros(sum(size for _, size in rows), total_rank, dtype=first.dtype)
    column = 0
    for member, adapter in adapters:
        start, size = rows[member]
        block = adapter.lora_up.weight.detach().to("cpu")
        if adapter.scale != scale:
            block = (block.float() * (adapter.scale / scale)).to(first.dtype)
        up[start : start + size, column : column + adapter.rank] = block
        column += adapter.rank
    down = torch.cat([adapter.lora_down.weight.detach().to("cpu") for _, adapter in adapters])
    return down, up, torch.tensor(scale * total_rank, dtype=torch.float32)


def _split(
    layer: _FileLayer,
    layers: NamedLayers,
    down: torch.Tensor,
    up: torch.Tensor,
    *,
    path: Path,
    keys: tuple[str, str],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter name -> (A, B) from the file's LoRA of this layer (see the module docstring).

    Into a network the adapters' ranks say how; against every layer of the model
    (`lora.init_from`, no adapters yet) the file does: members whose rows of B are all zero
    were not trained, and the others split as ours when B is block-diagonal among them."""
    members = sorted(layer.adapters.items())
    if layer.bfl is None or not layer.bfl.fused:
        return {members[0][1]: (down, up)}
    rank = down.shape[0]
    rows = layer.rows(down.shape[1])
    if up.shape != (sum(size for _, size in rows), rank):
        return {name: (down, up) for _, name in members}  # the shape check names the key
    if not isinstance(layers, LoRANetwork):
        trained = [(m, name) for m, name in members if up[slice(*_span(rows[m]))].any()]
        members = trained or members
        block = rank // len(members)
        ranks = (
            [block] * len(members) if _block_diagonal(up, rows, members) else [rank] * len(members)
        )
    else:
        ranks = [layers.adapters[name].rank for _, name in members]
    outside = torch.ones_like(up, dtype=torch.bool)  # entries no adapter of ours covers
    if rank == sum(ranks):  # ours: A stacked, B block-diagonal
        column, split = 0, {}
        for (member, name), member_rank in zip(members, ranks, strict=True):
            start, size = rows[member]
            split[name] = (
                down[column : column + member_rank],
                up[start : start + size, column : column + member_rank],
            )
            outside[start : start + size, column : column + member_rank] = False
            column += member_rank
        if not up[outside].any():
            return split
    outside.fill_(True)
    for member, _ in members:
        start, size = rows[member]
        outside[start : start + size] = False
    if up[outside].any():
        absent = [layer.bfl.members[m] for m in range(len(rows)) if m not in dict(members)]
        raise UserError(
            f"{path}: key {keys[1]!r} also trains {', '.join(absent)}, which this config puts no "
            "LoRA on; choose lora.layer_preset / layer_patterns that include them"
        )
    if all(member_rank == rank for member_rank in ranks):  # a plain LoRA on the fused layer
        return {
            name: (down, up[rows[member][0] : rows[member][0] + rows[member][1]])
            for member, name in members
        }
    # block-diagonal over as many members as ours: a file of ours at another rank
    per_member = rank // len(members) if _block_diagonal(up, rows, members) else rank
    raise UserError(
        f"{path}: key {keys[0]!r} has shape {tuple(down.shape)}, a rank-{per_member} LoRA per "
        f"layer where this config has rank {ranks[0]}; set lora.rank to {per_member} to "
        "continue from it"
    )


def _span(row: tuple[int, int]) -> tuple[int, int]:
    start, size = row
    return start, start + size


def _block_diagonal(
    up: torch.Tensor, rows: list[tuple[int, int]], members: list[tuple[int, str]]
) -> bool:
    """Whether B is block-diagonal for an equal split of its rank among `members`."""
    if up.shape[1] % len(members):
        return False
    width, covered = up.shape[1] // len(members), torch.zeros_like(up, dtype=torch.bool)
    for column, (member, _) in enumerate(members):
        start, size = rows[member]
        covered[start : start + size, column * width : (column + 1) * width] = True
    return not up[~covered].any()


def _kohya_text_stem(network: NamedLayers, name: str) -> str:
    return name  # the adapter's own kohya name: lora_te1_text_model_encoder_layers_0_...


def _comfyui_text_stem(network: NamedLayers, name: str) -> str:
    return f"text_encoders.clip_l.transformer.{network.export_path[name]}"


KOHYA_FLUX = BFLLayout(
    name="kohya",
    transformer_stem=lambda bfl_path: "lora_unet_" + bfl_path.replace(".", "_"),
    text_stem=_kohya_text_stem,
    prefixes=("lora_unet_", "lora_te1_"),
)
COMFYUI_FLUX = BFLLayout(
    name="comfyui",
    transformer_stem=lambda bfl_path: "diffusion_model." + bfl_path,
    text_stem=_comfyui_text_stem,
    prefixes=("diffusion_model.", "text_encoders."),
)


class DiffusersNamedKohyaLayout(KohyaLayout):
    """Reads kohya-suffixed files in diffusers' module names (`lora_transformer_...`, as
    OneTrainer writes Flux LoRAs); not offered for saving."""

    name = "kohya-diffusers-names"

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.startswith("lora_transformer_") for key in keys)


# detection order: OneTrainer's diffusers-named kohya keys before BFL's kohya names
FLUX_LORA_LAYOUTS = (DiffusersNamedKohyaLayout(), KOHYA_FLUX, COMFYUI_FLUX, PeftLayout())
