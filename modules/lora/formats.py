"""LoRA files on disk: writing a network in a layout, reading any file, loading it into a network.

The layouts themselves (how keys name layers) are in layouts.py; everything else is done here
once: safetensors I/O, metadata, atomic writes, and every check on a file before it changes the
network. Only safetensors is read or written: a LoRA file from the internet must never be
unpickled.
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from modules.errors import UserError
from modules.lora.layers import LoRAModule
from modules.lora.layouts import GENERIC_LAYOUTS, KOHYA_ALPHA, AdapterWeights, LoRALayout
from modules.lora.network import LoRANetwork
from modules.util.atomic import atomic_write

# Keys of adapters that are not a plain LoRA: continuing one as a LoRA would drop or misread
# weights, so such a file is refused by name.
_OTHER_ADAPTERS = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LyCORIS LoHa"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), "LyCORIS LoKr"),
    (re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with Tucker decomposition"),
    (re.compile(r"\.oft_(blocks|diag)$"), "OFT"),
    (re.compile(r"\.diff(_b)?$"), "full weight difference"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.weight)?)$"), "DoRA"),
    (re.compile(r"^bundle_emb\."), "bundled textual-inversion embedding"),
)


def unknown_key_error(path: Path, key: str) -> UserError:
    return UserError(
        f"{path}: key {key!r} matches no LoRA layer of this config; the file is for another "
        "model, or used other lora.layer_preset / layer_patterns / trained parts"
    )


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
        kind = next((kind for mark, kind in _OTHER_ADAPTERS if mark.search(key)), None)
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
