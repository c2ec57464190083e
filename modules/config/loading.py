"""Turn preset files and CLI overrides into a validated TrainConfig, with errors users can fix."""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from modules.config.migrations import migrate
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.util.atomic import atomic_write_text


class ConfigError(UserError):
    """A config problem; the message names the source, the key path and the fix."""


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file: {error}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.batch_size=2` -> (["training", "batch_size"], 2); values are JSON or plain text.

    Text fields keep non-string JSON verbatim, so `--set output.name=2024` is the name "2024".
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set training.batch_size=2")
    path = key.strip().split(".")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    _, field = _model_at(tuple(path))
    if field is not None and field.annotation is str and not isinstance(parsed, str):
        parsed = value
    return path, parsed


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            section = ".".join(path[: depth + 1])
            raise ConfigError(f"--set {'.'.join(path)}: {section} is not a section")
        node = child
    node[path[-1]] = value


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] = (),
    raw: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults, then the (migrated) file or `raw` dict merged over them, then CLI overrides."""
    source = str(path) if path is not None else "config"
    # Deep copy: migrations and overrides edit nested sections, never the caller's dict.
    data = read_json(path) if path is not None else copy.deepcopy(raw or {})
    try:
        data = migrate(data, source=source)
    except ConfigError:
        raise
    except UserError as error:
        raise ConfigError(str(error)) from None
    for override in overrides:
        apply_override(data, *parse_override(override))
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        lines = [describe_error(item) for item in error.errors()]
        raise ConfigError("\n".join(f"{source}: {line}" for line in lines)) from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), config_to_json(config))


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2) + "\n"


# -- error messages -----------------------------------------------------------------------------


def _model_at(path: tuple[Any, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The section class holding the last key of `path`, and that key's field (None if unknown)."""
    model: type[BaseModel] | None = TrainConfig
    field: FieldInfo | None = None
    for key in path:
        if isinstance(key, int):
            continue
        if model is None or key not in model.model_fields:
            return model, None
        field = model.model_fields[key]
        model = _section_type(field.annotation)
    return model, field


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _bounds(field: FieldInfo | None) -> str:
    if field is None:
        return ""
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "multiple of"}
    parts = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{word} {value}")
    return " and ".join(parts)


def _closest(word: Any, choices: Any, *, prefix: str = "") -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean {prefix + match[0]!r}?)" if match else ""


_RANGE_ERRORS = {
    "greater_than",
    "greater_than_equal",
    "less_than",
    "less_than_equal",
    "multiple_of",
}


def describe_error(item: dict[str, Any]) -> str:
    """One line per pydantic error, in the user's terms: key path, value, what is allowed."""
    loc = _user_loc(tuple(item["loc"]))
    key = ".".join(str(k) for k in loc) or "(top level)"
    kind, value = item["type"], item.get("input")
    if kind == "extra_forbidden":
        parent_model, _ = _model_at(loc[:-1])
        choices = parent_model.model_fields if parent_model else []
        prefix = "".join(f"{k}." for k in loc[:-1])
        return f"unknown key {key!r}{_closest(loc[-1], choices, prefix=prefix)}"
    _, field = _model_at(loc)
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    if kind == "literal_error":
        allowed = item["ctx"]["expected"]
        hint = _closest(value, _literal_choices(field))
        return f"{key} = {shown} is not allowed; choose one of {allowed}{hint}"
    if kind in _RANGE_ERRORS:
        return f"{key} = {shown} is out of range; allowed: {_bounds(field)}"
    if kind == "missing":
        return f"{key} is required"
    if kind == "value_error" and not loc:
        return str(item["msg"]).removeprefix("Value error, ")
    return f"{key} = {shown}: {item['msg'].removeprefix('Value error, ')}"


def _user_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`loc` without the union member / validator tags pydantic appends below a leaf field.

    Keys of sections are kept even when unknown (`training.intervals` stays a key).
    """
    kept: list[Any] = []
    model: type[BaseModel] | None = TrainConfig
    for key in loc:
        if isinstance(key, int):
            kept.append(key)
        elif model is not None:
            kept.append(key)
            field = model.model_fields.get(key)
            model = _section_type(field.annotation) if field is not None else None
        elif not key.startswith(("function-", "float", "int")):
            kept.append(key)
    return tuple(kept)


def _literal_choices(field: FieldInfo | None) -> list[str]:
    return [str(a) for a in getattr(field.annotation, "__args__", ())] if field else []


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
