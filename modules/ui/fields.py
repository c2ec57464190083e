"""The GUI's fields, generated from the schema's `option()` declarations.

One `FieldSpec` per editable leaf of the config (one `ListSpec` per list of sections, such as the
concepts): its key, its input kind (from the annotation and the declared widget), label, tab,
help, bounds and applicability. A new config field therefore appears in the window without any
GUI edit. Widget values are what an input holds (text, or a bool for ticks); `to_raw` turns them
into the raw JSON value the config loader validates, following the CLI's `--set` rules (JSON, or
plain text when not valid JSON), so a bad value gets exactly the CLI's message.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from modules.config.fields import GuiPlace, PathInput, Toggle, gui_place
from modules.config.model_base import PartSpec, part_spec
from modules.config.schema import TrainConfig
from modules.models.registry import FAMILIES

Path_ = tuple[str | int, ...]


class Kind(Enum):
    BOOL = "bool"  # a tick
    CHOICE = "choice"  # a dropdown over a Literal
    TOGGLE = "toggle"  # a tick over a Literal with an "off" value, the other values beside it
    NUMBER = "number"  # int or float typed as text
    OPTIONAL_NUMBER = "optional_number"  # empty means None
    TEXT = "text"
    PATH = "path"  # text with a file/folder picker
    LINES = "lines"  # list of strings, one per line
    NUMBERS = "numbers"  # list or tuple of numbers, separated by commas
    JSON = "json"  # a JSON object


@dataclass(frozen=True)
class FieldSpec:
    """One editable value of the config as the GUI shows it."""

    path: Path_
    kind: Kind
    label: str
    group: str  # the heading it is shown under
    help: str
    place: GuiPlace
    default: Any  # JSON value
    choices: tuple[str, ...] = ()
    bounds: str = ""
    part: str | None = None  # the model part whose setting this is ("unet")

    @property
    def key(self) -> str:
        return key_of(self.path)

    @property
    def tab(self) -> str:
        return self.place.tab

    @property
    def advanced(self) -> bool:
        return self.place.advanced

    @property
    def toggle(self) -> Toggle | None:
        widget = self.place.widget
        return widget if isinstance(widget, Toggle) else None

    @property
    def path_input(self) -> PathInput | None:
        widget = self.place.widget
        return widget if isinstance(widget, PathInput) else None

    def tooltip(self) -> str:
        """The help text, then the default and what is allowed."""
        lines = [self.help, "", f"Default: {json.dumps(self.default)}"]
        if self.bounds:
            lines.append(f"Allowed: {self.bounds}")
        lines.append(f"Config key: {self.key}")
        return "\n".join(lines)

    def to_widget(self, value: Any) -> Any:
        """A raw JSON value as its input shows it."""
        if self.kind is Kind.BOOL:
            return bool(value)
        if self.kind in (Kind.CHOICE, Kind.TOGGLE, Kind.TEXT, Kind.PATH):
            return "" if value is None else str(value)
        if self.kind is Kind.OPTIONAL_NUMBER and value is None:
            return ""
        if self.kind in (Kind.NUMBER, Kind.OPTIONAL_NUMBER):
            return _number_text(value)
        if self.kind is Kind.LINES:
            return "\n".join(value)
        if self.kind is Kind.NUMBERS:
            return ", ".join(_number_text(v) for v in value)
        return json.dumps(value)

    def to_raw(self, shown: Any) -> Any:
        """What an input holds as the raw value the loader validates (never raises: a bad value
        stays text and gets the loader's message)."""
        if self.kind in (Kind.BOOL, Kind.CHOICE, Kind.TOGGLE, Kind.TEXT):
            return shown
        text = str(shown)
        if self.kind is Kind.PATH:
            return text.strip()
        if self.kind is Kind.OPTIONAL_NUMBER and not text.strip():
            return None
        if self.kind is Kind.JSON and not text.strip():
            return {}  # a cleared box: no extra arguments
        if self.kind in (Kind.NUMBER, Kind.OPTIONAL_NUMBER, Kind.JSON):
            return json_or_text(text)
        if self.kind is Kind.LINES:
            return [line.rstrip() for line in text.splitlines() if line.strip()]
        return [json_or_text(token) for token in re.split(r"[,\s]+", text.strip()) if token]


@dataclass(frozen=True)
class ListSpec:
    """A list of sections (the concepts), edited item by item."""

    path: Path_
    label: str
    group: str
    help: str
    place: GuiPlace
    item_model: type[BaseModel]

    @property
    def key(self) -> str:
        return key_of(self.path)

    @property
    def tab(self) -> str:
        return self.place.tab

    @property
    def advanced(self) -> bool:
        return self.place.advanced

    def item_default(self) -> dict[str, Any]:
        return self.item_model().model_dump(mode="json")

    def item_fields(self, index: int) -> list[FieldSpec]:
        path, defaults = (*self.path, index), self.item_default()
        return list(_walk(self.item_model, path, defaults, group="", part=None))


Spec = FieldSpec | ListSpec


def key_of(path: Path_) -> str:
    return ".".join(str(p) for p in path)


def json_or_text(text: str) -> Any:
    """The CLI's reading of a value: JSON when it parses, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _number_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (int, float)) else str(value)


def form_fields(family: str) -> list[Spec]:
    """Every editable field of a config whose model section is `family`'s, in schema order."""
    defaults = TrainConfig.model_validate({"model": {"family": family}}).model_dump(mode="json")
    narrowed = FAMILIES[family][0].narrowed_choices()
    specs = _walk(TrainConfig, (), defaults, group="", part=None, family=family)
    return [_narrow(spec, narrowed.get(spec.key)) for spec in specs]


def _narrow(spec: Spec, allowed: tuple[str, ...] | None) -> Spec:
    """A choice offering only the values the model family takes (output.format's layouts)."""
    if allowed is None or not isinstance(spec, FieldSpec):
        return spec
    return dataclasses.replace(spec, choices=tuple(c for c in spec.choices if c in allowed))


def _walk(
    model: type[BaseModel],
    prefix: Path_,
    defaults: dict[str, Any],
    *,
    group: str,
    part: PartSpec | None,
    family: str | None = None,
) -> typing.Iterator[Spec]:
    """The specs of `model`'s fields below `prefix`; `defaults` is its default JSON in place
    (text encoders do not train by default, although a part's `train` defaults to true)."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        spec = part_spec(name, info)
        if spec is not None:  # one part of the base model: its settings, labelled with the part
            yield from _walk(info.annotation, path, defaults[name], group="", part=spec)
            continue
        if name == "model" and not prefix:
            section = FAMILIES[family][0]
            yield from _walk(section, path, defaults[name], group="Model", part=None)
            continue
        if _section(info.annotation) is not None:
            yield from _walk(info.annotation, path, defaults[name], group=_title(name), part=None)
            continue
        place = gui_place(info)
        if place is None:
            continue
        item = _list_item(info.annotation)
        if item is not None:
            help_text = info.description or ""
            yield ListSpec(path, place.label, group or _title(name), help_text, place, item)
            continue
        label, heading = (part.label, place.label) if part is not None else (place.label, group)
        if part is not None and not part.trainable and _of_training(name, place):
            continue  # a part that always stays frozen: no switch, nor settings of its training
        kind, choices = _kind(info.annotation, place)
        yield FieldSpec(
            path=path,
            kind=kind,
            label=label,
            group=heading,
            help=info.description or "",
            place=place,
            default=defaults[name],
            choices=choices,
            bounds=_bounds(info),
            part=part.name if part is not None else None,
        )


def _of_training(name: str, place: GuiPlace) -> bool:
    """A part's `train` switch, or a setting that applies only while the part trains."""
    return name == "train" or ("train", (True,)) in place.applies_when


def _kind(annotation: Any, place: GuiPlace) -> tuple[Kind, tuple[str, ...]]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return Kind.BOOL, ()
    if origin is Literal:
        choices = tuple(str(a) for a in args)
        if isinstance(place.widget, Toggle):
            return Kind.TOGGLE, tuple(c for c in choices if c != place.widget.off)
        return Kind.CHOICE, choices
    if annotation in (int, float):
        return Kind.NUMBER, ()
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return Kind.OPTIONAL_NUMBER, ()
    if annotation is str:
        return (Kind.PATH if isinstance(place.widget, PathInput) else Kind.TEXT), ()
    if origin is list and args == (str,):
        return Kind.LINES, ()
    if origin in (list, tuple):
        return Kind.NUMBERS, ()
    if origin is dict:
        return Kind.JSON, ()
    raise TypeError(f"no GUI input for a field of type {annotation}")


_BOUND_WORDS = {
    "ge": ">=",
    "gt": ">",
    "le": "<=",
    "lt": "<",
    "multiple_of": "multiple of",
    "min_length": "length >=",
}


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, word in _BOUND_WORDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{word} {value}")
    return " and ".join(parts)


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        return _section(typing.get_args(annotation)[0])
    return None


_TITLES = {"lora": "LoRA"}


def _title(name: str) -> str:
    """A section's heading from its key: `scheduler` -> "Scheduler"."""
    return _TITLES.get(name, name.replace("_", " ").capitalize())
