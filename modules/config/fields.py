"""`option()`: one declaration per config field carrying its default, bounds, help and GUI place.

Everything else (JSON load/save, preset merge, CLI overrides, validation messages, the reference
docs and the GUI) reads these declarations; nothing re-declares a field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Largest seed: torch generators take 64 bits and derived seeds (seed x prime + epoch, seed +
# prompt index) must stay inside them; 32 bits is also the range other tools' seeds use.
SEED_MAX = 2**32 - 1


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.

    Numbers must be finite: JSON readers accept `Infinity`, `NaN` and `1e999`, and no learning
    rate, alpha, weight decay or repeat count means anything as inf or nan. No text may hold a
    NUL byte: every path would fail at the first file operation, after the model has loaded.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul_byte(cls, value: Any) -> Any:
        texts = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(text, str) and "\x00" in text for text in texts):
            raise ValueError("contains a NUL byte (\\x00); remove it")
        return value


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
