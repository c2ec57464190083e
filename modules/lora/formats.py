"""Reading and writing LoRA files in the layouts other tools load.

A layout (`LoRALayout`) turns a network's adapters into file tensors and back. The two generic
ones live here: kohya (`<stem>.lora_down.weight`, `.lora_up.weight`, scalar `.alpha`), which
A1111, Forge, ComfyUI, sd-scripts and diffusers read, and diffusers/PEFT (`<part>.<module
path>.lora_A.weight` / `.lora_B.weight`), which only diffusers reads, with no alpha key, so the
alpha / rank scale is folded into lora_B. A family whose tools expect other names (SDXL's kohya
files name UNet layers after the original model) or fused layers configures or supplies its own
layouts (`ModelFamily.lora_layouts`), and the network carries them. Everything else is done here
once: safetensors I/O, metadata, atomic writes, and every check on a file before it changes the
network. Only safetensors is read or written: a LoRA file from the internet must never be
unpickled.
"""

from __future__ import annotations

import datetime
import json
import math
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import safetensors
import safetensors.torch
import torch

from modules.errors import UserError
from modules.lora.layers import LoRAModule
from modules.lora.network import LoRANetwork
from modules.util.atomic import atomic_write

KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"

# Key parts of adapters that are not a plain LoRA: continuing one as a LoRA would drop or
# misread weights, so such a file is refused by name.
_OTHER_ADAPTERS = {
    ".hada_w1_a": "LyCORIS LoHa",
    ".lokr_w1": "LyCORIS LoKr",
    ".lora_mid.weight": "LyCORIS LoCon with Tucker decomposition",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".diff": "full weight difference",
    ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA",
    "bundle_emb.": "bundled textual-inversion embedding",
}


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


def unknown_key_error(path: Path, key: str) -> UserError:
    return UserError(
        f"{path}: key {key!r} matches no LoRA layer of this config; the file is for another "
        "model, or used other lora.layer_preset / layer_patterns / trained parts"
    )


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


def build_metadata(
    *,
    config_json: str,
    rank: int,
    alpha: float,
    title: str,
    resolution: int | tuple[int, int] | str,
    trigger_phrase: str = "",
    base_model_version: str = "sdxl_base_v1-0",
    architecture: str = "stable-diffusion-xl-v1-base/lora",
    network_module: str = "networks.lora",
) -> dict[str, str]:
    """Header keys that A1111/Forge (ss_*) and ModelSpec readers use to file and filter LoRAs."""
    if isinstance(resolution, int):
        resolution = f"{resolution}x{resolution}"
    elif isinstance(resolution, tuple):
        resolution = f"{resolution[0]}x{resolution[1]}"
    return {
        "ss_base_model_version": base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "modelspec.resolution": resolution,
        "modelspec.trigger_phrase": trigger_phrase,
        "geodesic.config": config_json,
    }


def network_dim(network: LoRANetwork) -> tuple[int, float]:
    """The (rank, alpha) most adapters have: what `ss_network_dim` / `ss_network_alpha` say of a
    network whose layers may differ (continued from a file with its own ranks)."""
    counts = Counter((a.rank, float(a.alpha)) for a in network.adapters.values())
    return counts.most_common(1)[0][0]


def layouts_of(network: LoRANetwork) -> tuple[LoRALayout, ...]:
    """The layouts the network's family writes and reads (the generic ones unless it has its
    own)."""
    return tuple(network.layouts) or GENERIC_LAYOUTS


def layout_of(network: LoRANetwork, name: str) -> LoRALayout:
    """The network's layout called `name`."""
    for layout in layouts_of(network):
        if layout.name == name:
            return layout
    known = [layout.name for layout in layouts_of(network)]
    raise UserError(f"output.format {name!r} is not a layout of this model; choose one of {known}")


def save_lora(
    network: LoRANetwork,
    path: str | Path,
    *,
    layout: str,
    metadata: dict[str, str],
    dtype: torch.dtype | None = torch.float16,
) -> None:
    """Write the network as a safetensors file, atomically so a crash never leaves half a file."""
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; {bad[0]!r} is not")
    tensors = layout_of(network, layout).encode(network, dtype)
    # Looked up at call time (not imported by name) so tests can simulate a failing write.
    atomic_write(
        Path(path),
        lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=dict(metadata)),
    )


def _unreadable(path: Path, error: Exception) -> UserError:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return UserError(
        f"{path}: not a readable .safetensors file ({message}); only safetensors LoRA files "
        "are loaded (.ckpt/.pt/.bin are refused because they can run code)"
    )


def _open(path: Path):  # safetensors' handle type is private, hence no return annotation
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        return safetensors.safe_open(str(path), framework="pt", device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a LoRA file's header (empty if it has none)."""
    with _open(Path(path)) as handle:
        return dict(handle.metadata() or {})


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file; a truncated or malformed file is a UserError, and
    so is an adapter other than a plain LoRA (LoHa, LoKr, DoRA, ...), named."""
    path = Path(path)
    with _open(path) as handle:
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = dict(handle.metadata() or {})
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise _unreadable(path, error) from None
    for key in sorted(tensors):
        kind = next((kind for mark, kind in _OTHER_ADAPTERS.items() if mark in key), None)
        if kind is not None:
            raise UserError(
                f"{path}: holds {kind} weights ({key!r}), not a plain LoRA; only lora_down / "
                "lora_up (or lora_A / lora_B) files can be continued"
            )
    return tensors, metadata


def detect_layout(layouts: Sequence[LoRALayout], path: Path, keys: list[str]) -> LoRALayout:
    for layout in layouts:
        if layout.recognises(keys):
            return layout
    first = f"; first key {sorted(keys)[0]!r}" if keys else " (it holds no tensors)"
    names = " or ".join(layout.name for layout in layouts)
    raise UserError(f"{path}: not a LoRA in a layout this model reads ({names}){first}")


def _check_shape(
    path: Path, key: str, tensor: torch.Tensor, expected: torch.Tensor, *, rank_axis: int
) -> None:
    if tuple(tensor.shape) == tuple(expected.shape):
        return
    got, want = tuple(tensor.shape), tuple(expected.shape)
    same_layer = tensor.dim() == expected.dim() and all(
        g == w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != rank_axis
    )
    if same_layer:
        raise UserError(
            f"{path}: key {key!r} has shape {got} but this config expects {want} (rank "
            f"{want[rank_axis]}); the file has rank {got[rank_axis]}: set lora.rank to match the "
            "file"
        )
    raise UserError(
        f"{path}: key {key!r} has shape {got} but this config expects {want}; "
        "the file was trained for a different base model"
    )


def copy_into(network: LoRANetwork, weights: Mapping[str, AdapterWeights], path: Path) -> None:
    """Copy decoded weights into the network's adapters in place, after checking all of them.

    Every check runs before anything is copied, so a bad file leaves the network untouched.
    Copying goes through `load_state_dict`, which keeps the Parameter objects (optimizer state,
    hooks) and re-links the `_lora_pair` cross-links.
    """
    state: dict[str, torch.Tensor] = {}
    for name, file_weights in weights.items():
        adapter: LoRAModule = network.adapters[name]
        for rank_axis, value, key, target in (
            (0, file_weights.down, file_weights.keys[0], adapter.lora_down.weight),
            (1, file_weights.up, file_weights.keys[1], adapter.lora_up.weight),
        ):
            _check_shape(path, key, value, target, rank_axis=rank_axis)
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise UserError(f"{path}: key {key!r} holds NaN/inf or non-float values")
        up = file_weights.up
        if file_weights.alpha is None:  # the file's B carries the scale: keep ours, rescale B
            if adapter.scale == 0:
                raise UserError(f"{path}: lora.alpha is 0, so this file's layout cannot be loaded")
            up = up.float() * (1.0 / adapter.scale)
        else:
            state[f"{name}.alpha"] = file_weights.alpha
        state[f"{name}.lora_down.weight"] = file_weights.down
        state[f"{name}.lora_up.weight"] = up
    # `adapters` is keyed by adapter name (the network's own state dict adds `adapters.`).
    missing, unexpected = network.adapters.load_state_dict(state, strict=False)
    covered = {key.rpartition(".lora_")[0] for key in state if ".lora_" in key}
    leftover = [
        key for key in missing if key.split(".")[0] in covered and not key.endswith(KOHYA_ALPHA)
    ] + list(unexpected)
    if leftover:  # decoding covers the named adapters exactly; this guards against drift
        raise RuntimeError(f"internal LoRA key mismatch: {leftover[:3]}")
    for adapter in network.adapters.values():
        adapter.link_factors()


def load_lora_into(network: LoRANetwork, path: str | Path) -> str:
    """Load a LoRA file in any of the network's layouts into it in place; the file must hold
    exactly the network's layers. Returns the layout's name."""
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    layout = detect_layout(layouts_of(network), path, list(tensors))
    decoded = layout.decode(network, tensors, metadata, path=path)
    if decoded.unknown:
        raise unknown_key_error(path, decoded.unknown[0])
    missing = [name for name in network.adapters if name not in decoded.weights]
    if missing:
        raise UserError(
            f"{path}: the file has no weights for LoRA layer {missing[0]!r} that this config "
            "trains; it was trained on other layers (match lora.layer_preset / layer_patterns / "
            "trained parts)"
        )
    copy_into(network, decoded.weights, path)
    return layout.name
