"""`option()`: one declaration per config field carrying its default, bounds, help and GUI place.

Everything else (JSON load/save, preset merge, CLI overrides, validation messages, the reference
docs and the GUI) reads these declarations; nothing re-declares a field.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

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
class Toggle:
    """A choice shown as a tick: unticked is `off`; ticked is one of the other choices (`on`
    until the user picks another), offered beside the tick."""

    off: str
    on: str


@dataclass(frozen=True)
class PathInput:
    """A path typed or picked in a file dialog. `kind` says what the dialog picks
    ("file_or_folder" also takes other text, such as a Hugging Face repo id); with `must_exist`
    the GUI refuses to start while a non-empty value names nothing on disk, and with `required`
    (what to set it to) while it is empty, as the run itself would."""

    kind: Literal["folder", "file", "file_or_folder"]
    must_exist: bool = False
    required: str = ""  # "a diffusers folder, ...": an empty value refuses Start
    suffixes: tuple[str, ...] = ()  # file types the dialog offers first, e.g. (".safetensors",)


Widget = Toggle | PathInput


def empty_message(key: str, wanted: str) -> str:
    """What the run and the GUI say of a required path left empty."""
    return f"{key} is empty: set it to {wanted}"


@dataclass(frozen=True)
class GuiPlace:
    """Where and how the GUI shows a field.

    `applies_when` maps sibling fields (same section) to the values under which this field
    means something; elsewhere the GUI hides it (momentum only for SGD, and so on).
    """

    tab: str
    label: str
    advanced: bool = False
    applies_when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    widget: Widget | None = None

    def applies(self, siblings: dict[str, Any]) -> bool:
        return all(siblings.get(name) in values for name, values in self.applies_when)


def option(
    default: Any,
    *,
    help: str,  # noqa: A002 - reads naturally at the declaration site
    tab: str,
    label: str,
    advanced: bool = False,
    applies_when: dict[str, Any] | None = None,
    widget: Widget | None = None,
    **bounds: Any,
) -> Any:
    """Declare a config field. `bounds` are pydantic constraints (ge, le, gt, lt, ...).

    `applies_when={"name": "sgd"}` (or a tuple of values) shows the field in the GUI only while
    its sibling has one of those values; `widget` picks a special GUI input (Toggle, PathInput).
    """
    if isinstance(default, (list, dict)):
        value: dict[str, Any] = {"default_factory": partial(copy.deepcopy, default)}
    else:
        value = {"default": default}
    gui: dict[str, Any] = {"tab": tab, "label": label, "advanced": advanced}
    if applies_when:
        gui["applies_when"] = {
            name: list(values) if isinstance(values, (tuple, list)) else [values]
            for name, values in applies_when.items()
        }
    if widget is not None:
        gui["widget"] = {type(widget).__name__: _plain(widget.__dict__)}
    return Field(**value, description=help, json_schema_extra={"gui": gui}, **bounds)


_WIDGETS: dict[str, type] = {"Toggle": Toggle, "PathInput": PathInput}


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Kept JSON-shaped (lists, not tuples), so pydantic's JSON schema can carry it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def gui_place(field_info: Any) -> GuiPlace | None:
    extra = field_info.json_schema_extra
    gui = extra.get("gui") if isinstance(extra, dict) else None
    if not gui:
        return None
    widget = None
    for name, fields in gui.get("widget", {}).items():
        widget = _WIDGETS[name](
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        )
    return GuiPlace(
        tab=gui["tab"],
        label=gui["label"],
        advanced=gui["advanced"],
        applies_when=tuple((k, tuple(v)) for k, v in gui.get("applies_when", {}).items()),
        widget=widget,
    )
