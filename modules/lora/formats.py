"""Reading and writing LoRA files in the layouts other tools load (kohya and diffusers/PEFT).

kohya layout: the state dict of `network.adapters` (`<name>.lora_down.weight`,
`.lora_up.weight`, scalar `.alpha`), which A1111, Forge, ComfyUI and diffusers all read.
Diffusers layout: PEFT keys (`unet.<module path>.lora_A.weight` / `.lora_B.weight`) with no alpha
key, so the alpha / rank scale is folded into lora_B. Only safetensors is read or written: a LoRA
file from the internet must never be unpickled.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Literal

import safetensors
import safetensors.torch
import torch

from modules.errors import UserError
from modules.lora.layers import LoRAModule
from modules.lora.network import LoRANetwork
from modules.util.atomic import atomic_write

Layout = Literal["kohya", "diffusers"]

KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"


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


def peft_module_key(network: LoRANetwork, name: str) -> str:
    """`<part>.<module path>` as diffusers names the layer of adapter `name`.

    The path is the exported one, so CLIP layers carry the `text_model.` wrapper that kohya names
    have: transformers 5 dropped it from CLIPTextModel (diffusers then strips it) but not from
    CLIPTextModelWithProjection, and older loaders need it for both.
    """
    return f"{network.part_of[name]}.{network.export_path[name]}"


def _to_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous().clone()


def lora_state_dict(
    network: LoRANetwork, *, layout: Layout, dtype: torch.dtype | None = torch.float16
) -> dict[str, torch.Tensor]:
    """The tensors `save_lora` writes (CPU, contiguous, owned copies)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in network.adapters.items():
        down, up = adapter.lora_down.weight, adapter.lora_up.weight
        if layout == "kohya":
            tensors[name + KOHYA_DOWN] = _to_file(down, dtype)
            tensors[name + KOHYA_UP] = _to_file(up, dtype)
            # alpha stays float32: in fp16 a value such as 0.3 would change the scale.
            tensors[name + KOHYA_ALPHA] = _to_file(adapter.alpha.float().reshape(()), None)
        elif layout == "diffusers":
            key = peft_module_key(network, name)
            tensors[key + PEFT_A] = _to_file(down, dtype)
            # Fold in float32, then cast: diffusers has no alpha key and assumes alpha == rank.
            tensors[key + PEFT_B] = _to_file(up.float() * adapter.scale, dtype or up.dtype)
        else:
            raise ValueError(f"unknown LoRA layout {layout!r}")
    return tensors


def save_lora(
    network: LoRANetwork,
    path: str | Path,
    *,
    layout: Layout,
    metadata: dict[str, str],
    dtype: torch.dtype | None = torch.float16,
) -> None:
    """Write the network as a safetensors file, atomically so a crash never leaves half a file."""
    bad = [key for key, value in metadata.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; {bad[0]!r} is not")
    tensors = lora_state_dict(network, layout=layout, dtype=dtype)
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


def _detect_layout(path: Path, keys: list[str]) -> Layout:
    if any(key.endswith(KOHYA_DOWN) for key in keys):
        return "kohya"
    if any(key.endswith(PEFT_A) for key in keys):
        return "diffusers"
    first = f"; first key {sorted(keys)[0]!r}" if keys else " (it holds no tensors)"
    raise UserError(
        f"{path}: not a LoRA in kohya (lora_down/lora_up) or diffusers (lora_A/lora_B) "
        f"layout{first}"
    )


def _file_rank(key: str, tensor: torch.Tensor) -> int:
    return tensor.shape[0] if key.endswith((KOHYA_DOWN, PEFT_A)) else tensor.shape[1]


def _check_shape(
    path: Path, key: str, tensor: torch.Tensor, expected: torch.Tensor, rank: int
) -> None:
    if tuple(tensor.shape) == tuple(expected.shape):
        return
    got, want = tuple(tensor.shape), tuple(expected.shape)
    rank_axis = 0 if key.endswith((KOHYA_DOWN, PEFT_A)) else 1
    same_layer = tensor.dim() == expected.dim() and all(
        g == w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != rank_axis
    )
    if same_layer:
        raise UserError(
            f"{path}: key {key!r} has shape {got} but this config expects {want} (rank {rank}); "
            f"the file has rank {_file_rank(key, tensor)}: set lora.rank to match the file"
        )
    raise UserError(
        f"{path}: key {key!r} has shape {got} but this config expects {want}; "
        "the file was trained for a different base model"
    )


def _expected_keys(network: LoRANetwork, layout: Layout) -> dict[str, tuple[str, str]]:
    """File key -> (adapter name, "down" | "up" | "alpha") for every key the network accepts."""
    expected: dict[str, tuple[str, str]] = {}
    for name in network.adapters:
        if layout == "kohya":
            expected[name + KOHYA_DOWN] = (name, "down")
            expected[name + KOHYA_UP] = (name, "up")
            expected[name + KOHYA_ALPHA] = (name, "alpha")
        else:
            key = peft_module_key(network, name)
            expected[key + PEFT_A] = (name, "down")
            expected[key + PEFT_B] = (name, "up")
    return expected


def _unknown_key_error(path: Path, key: str) -> UserError:
    return UserError(
        f"{path}: key {key!r} matches no LoRA layer of this config; the file is for another "
        "model, or used other lora.layer_preset / layer_patterns / trained parts"
    )


def load_lora_into(network: LoRANetwork, path: str | Path) -> Layout:
    """Load a kohya or diffusers LoRA file into `network` in place (to continue training from it).

    Every check runs before anything is copied, so a bad file leaves the network untouched.
    Copying goes through `load_state_dict`, which keeps the Parameter objects (optimizer state,
    hooks) and re-links the `_lora_pair` cross-links. Returns the layout found.
    """
    path = Path(path)
    tensors, metadata = _read_file(path)
    layout = _detect_layout(path, list(tensors))
    expected = _expected_keys(network, layout)
    if layout == "diffusers":  # accept CLIP keys with or without the `text_model.` wrapper
        aliases = {
            key.replace(".text_model.", ".", 1): key for key in expected if ".text_model." in key
        }
        tensors = {aliases.get(key, key): value for key, value in tensors.items()}
    for key in sorted(tensors):
        if key not in expected:
            raise _unknown_key_error(path, key)
    for key in sorted(expected):
        if key not in tensors and not key.endswith(KOHYA_ALPHA):
            raise UserError(
                f"{path}: the file has no key {key!r} that this config expects; it was trained on "
                "other layers (match lora.layer_preset / layer_patterns / trained parts)"
            )
    state: dict[str, torch.Tensor] = {}
    for key, (name, role) in expected.items():
        adapter: LoRAModule = network.adapters[name]
        if role == "alpha":
            # kohya convention: no alpha key means alpha == rank (scale 1).
            value = tensors.get(key, torch.tensor(float(adapter.rank)))
            if value.numel() != 1 or not torch.isfinite(value).all():
                raise UserError(f"{path}: key {key!r} should be one finite number")
            state[f"{name}.alpha"] = value.reshape(()).float()
            continue
        target = adapter.lora_down.weight if role == "down" else adapter.lora_up.weight
        value = tensors[key]
        _check_shape(path, key, value, target, adapter.rank)
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise UserError(f"{path}: key {key!r} holds NaN/inf or non-float values")
        if layout == "diffusers" and role == "up":
            if adapter.scale == 0:
                raise UserError(
                    f"{path}: lora.alpha is 0, so a diffusers-layout file cannot be loaded"
                )
            file_scale = _peft_file_scale(path, metadata, network.part_of[name])
            value = value.float() * (file_scale / adapter.scale)  # B * file scale == ours
        state[f"{name}.lora_{role}.weight"] = value
    # `adapters` is keyed by kohya name (the network's own state dict adds `adapters.`).
    missing, unexpected = network.adapters.load_state_dict(state, strict=False)
    leftover = [key for key in missing if not key.endswith(KOHYA_ALPHA)] + list(unexpected)
    if leftover:  # the key maps above cover the network exactly; this guards against drift
        raise RuntimeError(f"internal LoRA key mismatch: {leftover[:3]}")
    for adapter in network.adapters.values():
        adapter.link_factors()
    return layout
