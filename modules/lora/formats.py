"""Reading and writing LoRA files in the layouts other tools load.

A layout (`LoRALayout`) turns a network's adapters into file tensors and back. The two generic
ones live here: kohya (`<adapter name>.lora_down.weight`, `.lora_up.weight`, scalar `.alpha`),
which A1111, Forge, ComfyUI and diffusers read, and diffusers/PEFT (`<part>.<module
path>.lora_A.weight` / `.lora_B.weight`) with no alpha key, so the alpha / rank scale is folded
into lora_B. A family whose tools expect other names or fused layers supplies its own layouts
(`ModelFamily.lora_layouts`), and the network carries them. Everything else is done here once:
safetensors I/O, metadata, atomic writes, and every check on a file before it changes the
network. Only safetensors is read or written: a LoRA file from the internet must never be
unpickled.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Mapping
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
_KOHYA_SUFFIXES = (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA)
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter's weights as a file holds them, shaped like the adapter's own factors."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None  # None: `up` already carries the whole alpha / rank scale
    keys: tuple[str, str]  # the file keys down and up came from, for messages


class LoRALayout(Protocol):
    """How one file layout names (and possibly fuses) a network's adapters."""

    name: str

    def recognises(self, keys: Collection[str]) -> bool:
        """Whether a file with these keys is in this layout."""

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The file's tensors (CPU, contiguous, owned copies; None keeps each tensor's dtype)."""

    def decode(
        self,
        network: LoRANetwork,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> dict[str, AdapterWeights]:
        """Adapter name -> its weights, for every adapter of `network`; a key that matches no
        adapter, or an adapter the file lacks, is a UserError (`unknown_key_error`,
        `missing_key_error`)."""


def unknown_key_error(path: Path, key: str) -> UserError:
    return UserError(
        f"{path}: key {key!r} matches no LoRA layer of this config; the file is for another "
        "model, or used other lora.layer_preset / layer_patterns / trained parts"
    )


def missing_key_error(path: Path, key: str) -> UserError:
    return UserError(
        f"{path}: the file has no key {key!r} that this config expects; it was trained on "
        "other layers (match lora.layer_preset / layer_patterns / trained parts)"
    )


def to_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU, contiguous, owned copy in `dtype` (None: the tensor's own)."""
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()


class KohyaLayout:
    """`<stem>.lora_down.weight`, `.lora_up.weight` and a float32 scalar `.alpha` per adapter.

    The stem is the adapter's name unless `stem` maps it to what the family's tools expect."""

    name = "kohya"

    def __init__(self, stem=None) -> None:
        self._stem = stem or (lambda network, name: name)

    def stems(self, network: LoRANetwork) -> dict[str, str]:
        """File stem -> adapter name."""
        return {self._stem(network, name): name for name in network.adapters}

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.endswith(KOHYA_DOWN) for key in keys)

    def encode(self, network: LoRANetwork, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for stem, name in self.stems(network).items():
            adapter = network.adapters[name]
            tensors[stem + KOHYA_DOWN] = to_file(adapter.lora_down.weight, dtype)
            tensors[stem + KOHYA_UP] = to_file(adapter.lora_up.weight, dtype)
            # alpha stays float32: in fp16 a value such as 0.3 would change the scale.
            tensors[stem + KOHYA_ALPHA] = to_file(adapter.alpha.float().reshape(()), None)
        return tensors

    def decode(
        self,
        network: LoRANetwork,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> dict[str, AdapterWeights]:
        stems = self.stems(network)
        for key in sorted(tensors):
            suffix = next((end for end in _KOHYA_SUFFIXES if key.endswith(end)), None)
            if suffix is None or key.removesuffix(suffix) not in stems:
                raise unknown_key_error(path, key)
        decoded = {}
        for stem, name in stems.items():
            down_key, up_key = stem + KOHYA_DOWN, stem + KOHYA_UP
            for key in (down_key, up_key):
                if key not in tensors:
                    raise missing_key_error(path, key)
            # kohya convention: no alpha key means alpha == rank (scale 1)
            rank = network.adapters[name].rank
            alpha = tensors.get(stem + KOHYA_ALPHA, torch.tensor(float(rank)))
            if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                raise UserError(f"{path}: key {stem + KOHYA_ALPHA!r} should be one finite number")
            decoded[name] = AdapterWeights(
                down=tensors[down_key],
                up=tensors[up_key],
                alpha=alpha.reshape(()).float(),
                keys=(down_key, up_key),
            )
        return decoded


def peft_module_key(network: LoRANetwork, name: str) -> str:
    """`<part>.<module path>` as diffusers names the layer of adapter `name`.

    The path is the exported one, so CLIP layers carry the `text_model.` wrapper that kohya names
    have: transformers 5 dropped it from CLIPTextModel (diffusers then strips it) but not from
    CLIPTextModelWithProjection, and older loaders need it for both.
    """
    return f"{network.part_of[name]}.{network.export_path[name]}"


class PeftLayout:
    """diffusers' PEFT keys, with alpha / rank folded into lora_B (diffusers assumes alpha ==
    rank when a file has no `lora_adapter_metadata`)."""

    name = "diffusers"

    def recognises(self, keys: Collection[str]) -> bool:
        return any(key.endswith(PEFT_A) for key in keys)

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
        network: LoRANetwork,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str],
        *,
        path: Path,
    ) -> dict[str, AdapterWeights]:
        modules = {peft_module_key(network, name): name for name in network.adapters}
        # CLIP keys are accepted with or without the `text_model.` wrapper
        aliases = {
            key.replace(".text_model.", ".", 1): key for key in modules if ".text_model." in key
        }
        renamed: dict[str, torch.Tensor] = {}
        for key in sorted(tensors):
            suffix = next((end for end in (PEFT_A, PEFT_B) if key.endswith(end)), None)
            module = key.removesuffix(suffix) if suffix else None
            module = aliases.get(module, module)
            if module not in modules:
                raise unknown_key_error(path, key)
            renamed[module + suffix] = tensors[key]
        decoded = {}
        for module, name in modules.items():
            down_key, up_key = module + PEFT_A, module + PEFT_B
            for key in (down_key, up_key):
                if key not in renamed:
                    raise missing_key_error(path, key)
            scale = _peft_file_scale(path, metadata, network.part_of[name])
            decoded[name] = AdapterWeights(
                down=renamed[down_key],
                up=renamed[up_key].float() * scale if scale != 1 else renamed[up_key],
                alpha=None,
                keys=(down_key, up_key),
            )
        return decoded


GENERIC_LAYOUTS: tuple[LoRALayout, ...] = (KohyaLayout(), PeftLayout())


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


def _open(path: Path):  # safetensors' handle type is private, hence no return annotation
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        return safetensors.safe_open(str(path), framework="pt", device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"{path}: not a readable .safetensors file ({message}); only safetensors LoRA files "
            "are loaded (.ckpt/.pt/.bin are refused because they can run code)"
        ) from None


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a LoRA file's header (empty if it has none)."""
    with _open(Path(path)) as handle:
        return dict(handle.metadata() or {})


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with _open(path) as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return tensors, dict(handle.metadata() or {})


def _peft_file_scale(path: Path, metadata: dict[str, str], part: str) -> float:
    """alpha / r of a PEFT file written by diffusers' `save_lora_weights` (1 when absent).

    Our diffusers files fold the scale into B, but diffusers' own trainers record `lora_alpha`
    in the `lora_adapter_metadata` header instead, and B alone would then be off by that factor.
    """
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: header 'lora_adapter_metadata' is not valid JSON") from None
    if f"{part}.lora_alpha" not in config:
        return 1.0
    if config.get(f"{part}.alpha_pattern") or config.get(f"{part}.rank_pattern"):
        raise UserError(f"{path}: per-layer alpha/rank patterns for {part} are not supported")
    rank = float(config[f"{part}.r"])
    denominator = rank**0.5 if config.get(f"{part}.use_rslora") else rank
    return float(config[f"{part}.lora_alpha"]) / denominator


def _detect_layout(network: LoRANetwork, path: Path, keys: list[str]) -> LoRALayout:
    for layout in layouts_of(network):
        if layout.recognises(keys):
            return layout
    first = f"; first key {sorted(keys)[0]!r}" if keys else " (it holds no tensors)"
    names = " or ".join(layout.name for layout in layouts_of(network))
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


def load_lora_into(network: LoRANetwork, path: str | Path) -> str:
    """Load a LoRA file in any of the network's layouts into it in place (to continue training
    from it); returns the layout's name.

    Every check runs before anything is copied, so a bad file leaves the network untouched.
    Copying goes through `load_state_dict`, which keeps the Parameter objects (optimizer state,
    hooks) and sets each adapter's scale from the file's alpha.
    """
    path = Path(path)
    tensors, metadata = _read_file(path)
    layout = _detect_layout(network, path, list(tensors))
    decoded = layout.decode(network, tensors, metadata, path=path)
    state: dict[str, torch.Tensor] = {}
    for name, weights in decoded.items():
        adapter: LoRAModule = network.adapters[name]
        for rank_axis, value, key, target in (
            (0, weights.down, weights.keys[0], adapter.lora_down.weight),
            (1, weights.up, weights.keys[1], adapter.lora_up.weight),
        ):
            _check_shape(path, key, value, target, rank_axis=rank_axis)
            if not value.is_floating_point() or not torch.isfinite(value).all():
                raise UserError(f"{path}: key {key!r} holds NaN/inf or non-float values")
        up = weights.up
        if weights.alpha is None:  # the file's B carries the scale: keep ours, rescale B
            if adapter.scale == 0:
                raise UserError(f"{path}: lora.alpha is 0, so this file's layout cannot be loaded")
            up = up.float() * (1.0 / adapter.scale)
        else:
            state[f"{name}.alpha"] = weights.alpha
        state[f"{name}.lora_down.weight"] = weights.down
        state[f"{name}.lora_up.weight"] = up
    # `adapters` is keyed by adapter name (the network's own state dict adds `adapters.`).
    missing, unexpected = network.adapters.load_state_dict(state, strict=False)
    leftover = [key for key in missing if not key.endswith(KOHYA_ALPHA)] + list(unexpected)
    if leftover:  # the layouts cover the network exactly; this guards against drift
        raise RuntimeError(f"internal LoRA key mismatch: {leftover[:3]}")
    return layout.name
