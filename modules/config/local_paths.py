"""Config fields that name files and folders on the user's machine, and a config without them.

A field declared `LocalPath` (or `LocalPathOrRepoId`) instead of `str` holds such a path. A
LoRA's metadata carries the config it was trained with so the training settings travel with the
file; shared on Civitai or the Hub, that config must not reveal the user's folders (home
directory, user name, dataset names), so `shareable_config` blanks those fields. The workspace's
config.json keeps them.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel


@dataclass(frozen=True)
class _LocalPathMark:
    repo_ids: bool  # the field may instead hold a Hugging Face repo id, which is kept


LocalPath = Annotated[str, _LocalPathMark(repo_ids=False)]
LocalPathOrRepoId = Annotated[str, _LocalPathMark(repo_ids=True)]

# `owner/name` of a Hugging Face repo: names a public model, not a folder of the user's
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def local_path_mark(field_info: Any) -> _LocalPathMark | None:
    """How a pydantic field (or list of them) is declared a local path; None if it is not."""
    metadata = [*field_info.metadata]
    for arg in typing.get_args(field_info.annotation):
        metadata += getattr(arg, "__metadata__", ())
    return next((mark for mark in metadata if isinstance(mark, _LocalPathMark)), None)


def shareable_config(config: BaseModel) -> dict[str, Any]:
    """`config.model_dump(mode="json")` with every local path blanked ("")."""
    return _blank(config, config.model_dump(mode="json"))


def _blank(section: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, field_info in type(section).model_fields.items():
        value, mark = getattr(section, name), local_path_mark(field_info)
        if mark is not None:
            dumped[name] = (
                [_shareable(item, mark) for item in value]
                if isinstance(value, list)
                else _shareable(value, mark)
            )
        elif isinstance(value, BaseModel):
            _blank(value, dumped[name])
        elif isinstance(value, list):
            for item, item_dump in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel):
                    _blank(item, item_dump)
    return dumped


def _shareable(value: str, mark: _LocalPathMark) -> str:
    """Blank, unless the field takes repo ids and this is one (and no folder here)."""
    if mark.repo_ids and _REPO_ID.fullmatch(value) and not Path(value).expanduser().exists():
        return value
    return ""
