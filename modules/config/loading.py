"""Turn preset files and CLI overrides into a validated TrainConfig, with errors users can fix."""

from __future__ import annotations

import copy
import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Tag, ValidationError
from pydantic.fields import FieldInfo

from modules.config.migrations import migrate
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.util.atomic import atomic_write_text


@dataclass(frozen=True)
class ConfigIssue:
    """One invalid value: the key path it is about (`lora.rank`; a section's own checks name the
    section) and the line the CLI prints for it, without the source."""

    key: str
    message: str


class ConfigError(UserError):
    """A config problem; the message names the source, the key path and the fix. `issues` holds
    the schema's complaints one by one (empty for unreadable files and failed migrations)."""

    def __init__(self, message: str, issues: tuple[ConfigIssue, ...] = ()) -> None:
        super().__init__(message)
        self.issues = issues


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
    except RecursionError:
        raise ConfigError(_too_deep(path)) from None
    if depth(raw) > MAX_DEPTH:
        raise ConfigError(_too_deep(path))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, got {type(raw).__name__}")
    return raw


# No config nests deeper than a few levels (data.validation.concepts.0.path is 5); a file that
# does is broken, and would only fail later, when the config is saved.
MAX_DEPTH = 32


def _too_deep(source: object) -> str:
    return f"{source}: JSON nested deeper than {MAX_DEPTH} levels; no config field takes that"


def depth(value: Any) -> int:
    """How deep JSON objects and arrays nest in `value` (walked without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, level + 1) for child in children)
    return deepest


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
    except RecursionError:
        raise ConfigError(_too_deep(f"--set {key.strip()}")) from None
    if depth(parsed) > MAX_DEPTH:
        raise ConfigError(_too_deep(f"--set {key.strip()}"))
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
        issues = tuple(describe_issue(item) for item in error.errors())
        lines = [f"{source}: {issue.message}" for issue in issues]
        raise ConfigError("\n".join(lines), issues) from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), config_to_json(config))


def config_to_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2) + "\n"


# -- error messages -----------------------------------------------------------------------------


def _sections(annotation: Any) -> dict[str | None, type[BaseModel]]:
    """The section classes a field holds: {None: cls} for a section or a list of them, and
    {tag: cls} for a union tagged by a discriminator (the family's `model` section)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {None: annotation}
    found: dict[str | None, type[BaseModel]] = {}
    for arg in typing.get_args(annotation):
        tag = next((m.tag for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)), None)
        for key, section in _sections(arg).items():
            found.setdefault(tag if tag is not None else key, section)
    return found


def _resolve(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None, Any]:
    """pydantic's `loc` as the user's key path, with the section holding its last key and that
    key's field (None if unknown). Union tags pydantic inserts (`model.sdxl.unet`) pick the
    section and are dropped, and so are the validator tags it appends below a leaf field; keys
    of sections are kept even when unknown (`training.intervals` stays a key)."""
    kept: list[Any] = []
    model: type[BaseModel] | None = TrainConfig
    parent: type[BaseModel] | None = None
    field: FieldInfo | None = None
    options: dict[str | None, type[BaseModel]] = {}
    for key in loc:
        if isinstance(key, int):
            kept.append(key)
        elif len(options) > 1 and key in options:  # a union tag: pick that member
            model, options = options[key], {}
        elif model is not None:
            kept.append(key)
            parent, field = model, model.model_fields.get(key)
            options = _sections(field.annotation) if field is not None else {}
            model = options.get(None) if len(options) == 1 else None
        elif not key.startswith(("function-", "float", "int")):
            kept.append(key)
            parent, field = None, None
    return tuple(kept), parent, field


def _model_at(path: tuple[Any, ...]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The section holding the last key of a user's key path, and that key's field (None if
    unknown). Below a union (`model`), the first member that has the next key is taken."""
    model: type[BaseModel] | None = TrainConfig
    field: FieldInfo | None = None
    for position, key in enumerate(path):
        if isinstance(key, int):
            continue
        if model is None or key not in model.model_fields:
            return model, None
        field = model.model_fields[key]
        members = list(_sections(field.annotation).values())
        following = path[position + 1] if position + 1 < len(path) else None
        model = next((m for m in members if following in m.model_fields), None) or (
            members[0] if members else None
        )
    return model, field


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


def describe_issue(item: dict[str, Any]) -> ConfigIssue:
    loc, _, _ = _resolve(tuple(item["loc"]))
    return ConfigIssue(key=".".join(str(k) for k in loc), message=describe_error(item))


def describe_error(item: dict[str, Any]) -> str:
    """One line per pydantic error, in the user's terms: key path, value, what is allowed."""
    loc, parent, field = _resolve(tuple(item["loc"]))
    key = ".".join(str(k) for k in loc) or "(top level)"
    kind, value = item["type"], item.get("input")
    if kind == "extra_forbidden":
        choices = parent.model_fields if parent else []
        prefix = "".join(f"{k}." for k in loc[:-1])
        return f"unknown key {key!r}{_closest(loc[-1], choices, prefix=prefix)}"
    shown = json.dumps(value) if _jsonable(value) else repr(value)
    if kind == "union_tag_invalid":
        ctx = item["ctx"]
        tag, allowed = json.dumps(ctx["tag"]), ctx["expected_tags"]
        return f"{key}.family = {tag} is not allowed; choose one of {allowed}"
    if kind == "literal_error":
        allowed = item["ctx"]["expected"]
        hint = _closest(value, _literal_choices(field))
        return f"{key} = {shown} is not allowed; choose one of {allowed}{hint}"
    if kind in _RANGE_ERRORS:
        return f"{key} = {shown} is out of range; allowed: {_bounds(field)}"
    if kind == "finite_number":
        allowed = _bounds(field)
        return f"{key} = {shown} is not a finite number" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    if kind == "missing":
        return f"{key} is required"
    if kind in ("model_type", "dict_type"):
        return f"{key} must be a JSON object ({{...}}), got {shown}"
    if kind == "value_error" and (not loc or (field is not None and _sections(field.annotation))):
        return str(item["msg"]).removeprefix("Value error, ")  # a section's own check
    return f"{key} = {shown}: {item['msg'].removeprefix('Value error, ')}"


def _literal_choices(field: FieldInfo | None) -> list[str]:
    return [str(a) for a in getattr(field.annotation, "__args__", ())] if field else []


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
