"""Config fields that name files and folders on the user's machine, and a config without them.

A field declared `LocalPath` (instead of `str`) holds such a path. A LoRA's metadata carries the
config it was trained with so the training settings travel with the file; shared on Civitai or
the Hub, that config must not reveal the user's folders (home directory, user name, dataset
names), so `shareable_config` blanks those fields. The workspace's config.json keeps them.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel


class _LocalPathMark:
    def __repr__(self) -> str:
        return "LocalPath"


LOCAL_PATH = _LocalPathMark()
LocalPath = Annotated[str, LOCAL_PATH]

# `owner/name` of a Hugging Face repo: names a public model, not a folder of the user's
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_local_path_field(field_info: Any) -> bool:
    """Whether a pydantic field (or list of them) is declared `LocalPath`."""
    if LOCAL_PATH in field_info.metadata:
        return True
    return any(
        LOCAL_PATH in getattr(arg, "__metadata__", ())
        for arg in typing.get_args(field_info.annotation)
    )


def shareable_config(config: BaseModel) -> dict[str, Any]:
    """`config.model_dump(mode="json")` with every local path blanked ("")."""
    return _blank(config, config.model_dump(mode="json"))


def _blank(section: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, field_info in type(section).model_fields.items():
        value = getattr(section, name)
        if is_local_path_field(field_info):
            dumped[name] = (
                [_shareable(item) for item in value]
                if isinstance(value, list)
                else _shareable(value)
            )
        elif isinstance(value, BaseModel):
            _blank(value, dumped[name])
        elif isinstance(value, list):
            for item, item_dump in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel):
                    _blank(item, item_dump)
    return dumped


def _shareable(value: str) -> str:
    """Blank for a local path; a Hugging Face repo id (not a folder here) is kept."""
    if _REPO_ID.fullmatch(value) and not Path(value).exists():
        return value
    return ""
