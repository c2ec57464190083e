"""Where a base model comes from (a diffusers folder, a hub repo id, a single file), shared by
the families' loaders, with one error line that says which kind of source failed and why."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from modules.config.fields import empty_message
from modules.config.model_base import BASE_MODEL_KINDS
from modules.errors import UserError

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

T = TypeVar("T")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def load_from_source(
    base_model: str,
    *,
    folder: Callable[[Path], T],
    single_file: Callable[[Path], T],
    repo_id: Callable[[str], T],
) -> T:
    """Call the loader that fits `model.base_model`: a folder, a single file, or else a repo id."""
    source = base_model.strip()
    if not source:
        raise UserError(empty_message("model.base_model", BASE_MODEL_KINDS))
    path = Path(source).expanduser()
    if path.is_dir():
        return attempt("local diffusers folder", source, lambda: folder(path))
    if path.is_file() or path.suffix.lower() in (*SINGLE_FILE_SUFFIXES, *PICKLED_SUFFIXES):
        return attempt("single-file checkpoint", source, lambda: single_file(path))
    return attempt("Hugging Face repo id", source, lambda: repo_id(source))


def attempt(kind: str, source: str, load: Callable[[], T]) -> T:
    """Run `load`; a library error becomes one UserError line naming the source and its kind."""
    try:
        return load()
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ""
        if kind == "Hugging Face repo id" and offline():
            hint = " (offline: HF_HUB_OFFLINE=1; point model.base_model at a local folder or file)"
        elif kind == "Hugging Face repo id":
            hint = " (not a local folder or file either; check the path)"
        raise UserError(f"model.base_model {source!r} as a {kind} failed: {reason}{hint}") from None


def check_single_file(path: Path) -> None:
    """A single-file checkpoint must exist and be safetensors: pickled files can run code."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserError(
            f"model.base_model {str(path)!r}: only .safetensors single files are loaded (pickled "
            f"{path.suffix} checkpoints can run code); convert it to .safetensors first"
        )
