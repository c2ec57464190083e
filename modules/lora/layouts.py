"""The file layouts of a LoRA: how each names (and possibly fuses) a network's adapters.

A layout (`LoRALayout`) turns a network's adapters into file tensors and back. The two generic
ones live here: kohya (`<stem>.lora_down.weight`, `.lora_up.weight`, scalar `.alpha`), which
A1111, Forge, ComfyUI, sd-scripts and diffusers read, and diffusers/PEFT (`<part>.<module
path>.lora_A.weight` / `.lora_B.weight`), which only diffusers reads, with no alpha key, so the
alpha / rank scale is folded into lora_B. A family whose tools expect other names (SDXL's kohya
files name UNet layers after the original model) or fused layers configures or supplies its own
layouts (`ModelFamily.lora_layouts`). A layout decodes a file against any set of named layers:
a network's adapters (loading into it) or every layer of a model (`lora.init_from`, where the
file decides the layers), and reads the names other trainers give a layer too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from modules.errors import UserError

if TYPE_CHECKING:
    from modules.lora.network import LoRANetwork

KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"


class NamedLayers(Protocol):
    """Layers by adapter name: a network's adapters, or every layer a LoRA could go on
    (`LayerCatalog`)."""

    part_of: Mapping[str, str]  # adapter name -> model part
    module_path: Mapping[str, str]  # adapter name -> module path inside its part
    export_path: Mapping[str, str]  # adapter name -> that path as kohya/diffusers files name it


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's weights as a file holds them, shaped like the adapter's own factors."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None  # None: `up` already carries the whole alpha / rank scale
    keys: tuple[str, str]  # the file keys down and up came from, for messages


@dataclass(frozen=True)
class DecodedFile:
    weights: dict[str, AdapterWeights]  # adapter name -> weights, for the layers the file holds
    unknown: list[str]  # file keys that name no layer of the layers it was decoded against


class LoRALayout(Protocol):
    """How one file layout names (and possibly fuses) a network's adapters."""

    name: str

    def recognises(self, keys: Collection[str]) -> bool:
        """Whether a file with these keys is in this layout."""

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The file's tensors (CPU, contiguous, owned copies; None keeps each tensor's dtype)."""

    def decode(
        self,
        layers: NamedLayers,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> DecodedFile:
        """The weights of every layer of `layers` the file holds, and the keys that name none;
        a layer whose weights are incomplete or malformed is a UserError."""


def to_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU, contiguous, owned copy in `dtype` (None: the tensor's own)."""
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()


def _name_table(
    layers: NamedLayers, names_of: Callable[[NamedLayers, str], Sequence[str]]
) -> dict[str, str]:
    """File name -> adapter name, over every name each layer is known by in files."""
    table: dict[str, str] = {}
    for name in layers.part_of:
        for file_name in names_of(layers, name):
            if table.setdefault(file_name, name) != name:
                raise RuntimeError(f"layers {table[file_name]} and {name} share {file_name!r}")
    return table


def _scalar_alpha(path: Path, key: str, value: torch.Tensor) -> torch.Tensor:
    if value.numel() != 1 or not value.is_floating_point() or not torch.isfinite(value).all():
        raise UserError(f"{path}: key {key!r} should be one finite number")
    return value.reshape(()).float()


def _twice_error(path: Path, name: str, first: str, second: str) -> UserError:
    return UserError(f"{path}: keys {first!r} and {second!r} both hold LoRA layer {name!r}")


class KohyaLayout:
    """`<stem>.lora_down.weight`, `.lora_up.weight` and a float32 scalar `.alpha` per adapter.

    `stems(layers, name)` gives the stems a layer is known by in kohya-style files: the first is
    written, all are read (the adapter's own name when not given)."""

    name = "kohya"

    def __init__(self, stems: Callable[[NamedLayers, str], Sequence[str]] | None = None) -> None:
        self._stems = stems or (lambda layers, name: (name,))

    def stem(self, layers: NamedLayers, name: str) -> str:
        """The stem this layout writes for adapter `name`."""
        return self._stems(layers, name)[0]

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.endswith(KOHYA_DOWN) for key in keys)

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, adapter in network.adapters.items():
            stem = self.stem(network, name)
            tensors[stem + KOHYA_DOWN] = to_file(adapter.lora_down.weight, dtype)
            tensors[stem + KOHYA_UP] = to_file(adapter.lora_up.weight, dtype)
            # alpha stays float32: in fp16 a value such as 0.3 would change the scale.
            tensors[stem + KOHYA_ALPHA] = to_file(adapter.alpha.float().reshape(()), None)
        return tensors

    def decode(
        self,
        layers: NamedLayers,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> DecodedFile:
        table = _name_table(layers, self._stems)
        found: dict[str, dict[str, str]] = {}  # adapter name -> suffix -> file key
        unknown = []
        for key in sorted(tensors):
            suffix = next(
                (end for end in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA) if key.endswith(end)), ""
            )
            name = table.get(key.removesuffix(suffix)) if suffix else None
            if name is None:
                unknown.append(key)
                continue
            seen = found.setdefault(name, {})
            if suffix in seen:
                raise _twice_error(path, name, seen[suffix], key)
            seen[suffix] = key
        weights = {}
        for name, keys in found.items():
            for suffix in (KOHYA_DOWN, KOHYA_UP):
                if suffix not in keys:
                    present_suffix, present = next(iter(keys.items()))
                    stem = present.removesuffix(present_suffix)
                    raise UserError(
                        f"{path}: key {stem + suffix!r} is missing; the file is cut short"
                    )
            down = tensors[keys[KOHYA_DOWN]]
            # kohya convention: no alpha key means alpha == rank (scale 1)
            alpha_key = keys.get(KOHYA_ALPHA)
            alpha = (
                _scalar_alpha(path, alpha_key, tensors[alpha_key])
                if alpha_key
                else torch.tensor(float(down.shape[0]))
            )
            weights[name] = AdapterWeights(
                down=down,
                up=tensors[keys[KOHYA_UP]],
                alpha=alpha,
                keys=(keys[KOHYA_DOWN], keys[KOHYA_UP]),
            )
        return DecodedFile(weights=weights, unknown=unknown)


def peft_module_key(layers: NamedLayers, name: str) -> str:
    """`<part>.<module path>` as diffusers names the layer of adapter `name`.

    The path is the exported one, so CLIP layers carry the `text_model.` wrapper that kohya names
    have: transformers 5 dropped it from CLIPTextModel (diffusers then strips it) but not from
    CLIPTextModelWithProjection, and older loaders need it for both.
    """
    return f"{layers.part_of[name]}.{layers.export_path[name]}"


def _peft_module_keys(layers: NamedLayers, name: str) -> tuple[str, ...]:
    key = peft_module_key(layers, name)
    # CLIP keys are accepted with or without the `text_model.` wrapper
    return (key, key.replace(".text_model.", ".", 1)) if ".text_model." in key else (key,)


class PeftLayout:
    """diffusers' PEFT keys, with alpha / rank folded into lora_B (diffusers assumes alpha ==
    rank when a file has no `lora_adapter_metadata`).

    `normalise` turns the keys of older diffusers formats of a family into PEFT keys before
    reading (values untouched)."""

    name = "diffusers"

    def __init__(
        self, normalise: Callable[[dict[str, object]], dict[str, object]] | None = None
    ) -> None:
        self._normalise = normalise or (lambda tensors: tensors)

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.endswith(PEFT_A) for key in self._normalise(dict.fromkeys(keys)))

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, adapter in network.adapters.items():
            key = peft_module_key(network, name)
            up = adapter.lora_up.weight
            tensors[key + PEFT_A] = to_file(adapter.lora_down.weight, dtype)
            # fold in float32, then cast
            tensors[key + PEFT_B] = to_file(up.float() * adapter.scale, dtype or up.dtype)
        return tensors

    def decode(
        self,
        layers: NamedLayers,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> DecodedFile:
        table = _name_table(layers, _peft_module_keys)
        renamed_keys = list(self._normalise(dict.fromkeys(tensors)))
        if len(renamed_keys) != len(tensors):
            raise UserError(f"{path}: the file holds some layers twice, in two key formats")
        renamed = dict(zip(renamed_keys, tensors.values(), strict=True))
        original = dict(
            zip(renamed_keys, tensors, strict=True)
        )  # the file's own keys, for messages
        found: dict[str, dict[str, str]] = {}
        unknown = []
        for key in sorted(renamed):
            suffix = next((end for end in (PEFT_A, PEFT_B) if key.endswith(end)), "")
            name = table.get(key.removesuffix(suffix)) if suffix else None
            if name is None:
                unknown.append(original[key])
                continue
            seen = found.setdefault(name, {})
            if suffix in seen:
                raise _twice_error(path, name, original[seen[suffix]], original[key])
            seen[suffix] = key
        scales = {}
        weights = {}
        for name, keys in found.items():
            for suffix in (PEFT_A, PEFT_B):
                if suffix not in keys:
                    present = original[next(iter(keys.values()))]
                    raise UserError(
                        f"{path}: key {present!r} has no {suffix.split('.')[1]} partner; "
                        "the file is cut short"
                    )
            part = layers.part_of[name]
            if part not in scales:
                scales[part] = peft_file_scale(path, metadata, part)
            up = renamed[keys[PEFT_B]]
            weights[name] = AdapterWeights(
                down=renamed[keys[PEFT_A]],
                up=up.float() * scales[part] if scales[part] != 1 else up,
                alpha=None,
                keys=(original[keys[PEFT_A]], original[keys[PEFT_B]]),
            )
        return DecodedFile(weights=weights, unknown=unknown)


GENERIC_LAYOUTS: tuple[LoRALayout, ...] = (KohyaLayout(), PeftLayout())


def peft_file_scale(path: Path, metadata: Mapping[str, str], part: str) -> float:
    """alpha / r of a PEFT file written by diffusers' `save_lora_weights` (1 when absent).

    Our diffusers files fold the scale into B, but diffusers' own trainers record `lora_alpha`
    in the `lora_adapter_metadata` header instead, and B alone would then be off by that factor.
    """
    header = "header 'lora_adapter_metadata'"
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: {header} is not valid JSON") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: {header} should be a JSON object")
    if config.get(f"{part}.use_dora"):
        raise UserError(f"{path}: a DoRA file ({header} sets use_dora); only plain LoRA continues")
    if f"{part}.lora_alpha" not in config:
        return 1.0
    if config.get(f"{part}.alpha_pattern") or config.get(f"{part}.rank_pattern"):
        raise UserError(f"{path}: per-layer alpha/rank patterns for {part} are not supported")
    numbers = {}
    for field in ("r", "lora_alpha"):
        value = config.get(f"{part}.{field}")
        good = isinstance(value, int | float) and not isinstance(value, bool)
        if not good or not math.isfinite(value) or (field == "r" and value <= 0):
            raise UserError(f"{path}: {header} has {part}.{field} = {value!r}, not a valid number")
        numbers[field] = float(value)
    denominator = numbers["r"] ** 0.5 if config.get(f"{part}.use_rslora") else numbers["r"]
    return numbers["lora_alpha"] / denominator
