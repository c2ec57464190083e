"""`option()`: one declaration per config field carrying its default, bounds, help and GUI place.

Everything else (JSON load/save, preset merge, CLI overrides, validation messages, the reference
docs and the GUI) reads these declarations; nothing re-declares a field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class GuiPlace:
    """Where the GUI shows a field."""

    tab: str
    label: str
    advanced: bool = False


def option(
    default: Any,
    *,
    help: str,  # noqa: A002 - reads naturally at the declaration site
    tab: str,
    label: str,
    advanced: bool = False,
    **bounds: Any,
) -> Any:
    """Declare a config field. `bounds` are pydantic constraints (ge, le, gt, lt, ...)."""
    if isinstance(default, (list, dict)):
        value: dict[str, Any] = {"default_factory": partial(copy.deepcopy, default)}
    else:
        value = {"default": default}
    return Field(
        **value,
        description=help,
        json_schema_extra={"gui": {"tab": tab, "label": label, "advanced": advanced}},
        **bounds,
    )


def gui_place(field_info: Any) -> GuiPlace | None:
    extra = field_info.json_schema_extra
    gui = extra.get("gui") if isinstance(extra, dict) else None
    return GuiPlace(**gui) if gui else None
