"""On-disk cache entries for latents and text embeddings (safetensors), keyed by what made them.

An entry's name is the SHA-256 of its key fields (file content hash, encoder fingerprint, bucket,
crop, flip, ...), so a changed image, model or setting simply looks up another entry and nothing
is ever invalidated by hand. Entries are written atomically and carry their key and a CRC32 of
their tensors; a corrupt, partial or foreign entry reads as missing and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from modules.util.atomic import atomic_file

log = logging.getLogger(__name__)

# Bump when the pixels an entry is made from change (resize filter, crop rule, colour handling).
FORMAT_VERSION = 1


def cache_root(*, cache_dir: str, workspace: Path) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else workspace / "cache"


def entry_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True).encode()
    ).hexdigest()


def entry_path(root: Path, kind: str, key: str) -> Path:
    return root / kind / key[:2] / f"{key}.safetensors"


def _crc(tensors: dict[str, torch.Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        data = tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(data, zlib.crc32(name.encode(), crc))
    return f"{crc:08x}"


def write_entry(path: Path, tensors: dict[str, torch.Tensor], *, key: str) -> None:
    """Write an entry atomically; a full disk is a WriteError naming the entry."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = {"key": key, "crc32": _crc(tensors)}
    with atomic_file(path) as handle:
        handle.write(safetensors.torch.save(tensors, metadata=metadata))


def read_entry(path: Path, *, key: str) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, or None when it is missing or not a complete entry for `key`."""
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except FileNotFoundError:
        return None
    except Exception as error:  # a truncated or garbled file: rebuild it
        log.warning("cache entry %s is unreadable (%s); it will be rebuilt", path, error)
        return None
    if metadata.get("key") != key or metadata.get("crc32") != _crc(tensors):
        log.warning("cache entry %s is corrupt or stale; it will be rebuilt", path)
        return None
    return tensors


def fingerprint(modules: list[nn.Module], *, extra: str = "") -> str:
    """A short identity of frozen modules' weights: names, shapes, dtypes and two moments.

    Computed where the weights live with one host sync; any fine-tune, merge or dtype change
    moves it, so caches of another VAE or text encoder are never mixed in.
    """
    digest = hashlib.sha256(extra.encode())
    for index, module in enumerate(modules):
        moments = []
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{index}.{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            if tensor.is_floating_point():
                moments.append(tensor.sum(dtype=torch.float64))
                moments.append(tensor.abs().sum(dtype=torch.float64))
            else:
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).numpy().tobytes())
        if moments:
            digest.update(torch.stack(moments).cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
