"""Captions: where they come from, and the per-use augmentations (trigger word, tags, dropout).

`read_caption` runs once per image at scan time; `augment` runs every time an image is used, with a
random generator derived from (seed, position), so a resumed run sees the same captions.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np

from modules.config.data_schema import ConceptConfig


class CaptionError(Exception):
    """A caption that cannot be read; the message is the scan report's reason."""


def caption_file(image: Path, concept: ConceptConfig) -> Path:
    return image.with_suffix(concept.caption_extension)


def read_caption(image: Path, concept: ConceptConfig) -> str:
    """The base caption of `image` as the concept's caption_source says."""
    if concept.caption_source == "prompt":
        return concept.prompt.strip()
    if concept.caption_source == "filename":
        return image.stem.replace("_", " ").strip()
    path = caption_file(image, concept)
    try:
        raw = _read_regular_file(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise CaptionError(
                f"caption {path.name} is a broken link (its target is missing)"
            ) from None
        if concept.require_caption:
            raise CaptionError(
                f"missing caption {path.name} (add it or set require_caption false)"
            ) from None
        return ""
    except OSError as error:
        raise CaptionError(f"caption {path.name} unreadable: {error.strerror or error}") from None
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise CaptionError(
            f"caption {path.name} is not UTF-8 (byte {error.start}); re-save it as UTF-8"
        ) from None


def _read_regular_file(path: Path) -> bytes:
    """The file's bytes; OSError when it is not a regular file. Opened without blocking and
    checked on the open handle, so a FIFO (whose read would wait forever) is never read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or folder)")
        return handle.read()


def with_trigger(caption: str, concept: ConceptConfig) -> str:
    """`caption` with the trigger word first (added only when it is not already first)."""
    trigger = concept.trigger_word.strip()
    if not trigger:
        return caption
    first = caption.split(concept.tag_separator, 1)[0].strip()
    if first == trigger:
        return caption
    return join_tags([trigger, caption], concept.tag_separator) if caption else trigger


def varies_per_use(concept: ConceptConfig) -> bool:
    """True when captions change beyond {caption, ""}, so their embeddings cannot be cached."""
    return concept.shuffle_tags or concept.tag_dropout > 0


def caption_variants(caption: str, concept: ConceptConfig) -> list[str]:
    """Every caption `augment` can return when it does not vary per use (for the text cache)."""
    full = with_trigger(caption, concept)
    return [full, ""] if concept.caption_dropout > 0 else [full]


def split_tags(caption: str, separator: str) -> list[str]:
    return [tag.strip() for tag in caption.split(separator) if tag.strip()]


def join_tags(tags: list[str], separator: str) -> str:
    return (separator.strip() + " " if separator.strip() else separator).join(tags)


def augment(caption: str, concept: ConceptConfig, rng: np.random.Generator) -> str:
    """Caption dropout, then tag shuffle and tag dropout behind the trigger and the kept tags."""
    if concept.caption_dropout > 0 and rng.random() < concept.caption_dropout:
        return ""
    if not varies_per_use(concept):
        return with_trigger(caption, concept)
    tags = split_tags(caption, concept.tag_separator)
    kept, rest = tags[: concept.keep_tags], tags[concept.keep_tags :]
    if concept.shuffle_tags:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    if concept.tag_dropout > 0:
        rest = [tag for tag in rest if rng.random() >= concept.tag_dropout]
    return with_trigger(join_tags(kept + rest, concept.tag_separator), concept)
