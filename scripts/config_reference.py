"""Generate the config reference (docs/config.md) from the TrainConfig schema.

    python scripts/config_reference.py           # print the Markdown
    python scripts/config_reference.py --write   # (re)write docs/config.md
    python scripts/config_reference.py --check   # exit 1 if docs/config.md is out of date

Everything comes from the `option()` declarations in modules/config/schema.py: key path, type,
default, bounds, GUI place and help. tests/test_config.py fails when docs/config.md drifts.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel, Tag  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402

from modules.config.fields import gui_place  # noqa: E402
from modules.config.schema import CONFIG_VERSION, TrainConfig  # noqa: E402
from modules.util.atomic import atomic_write_text  # noqa: E402

DOCS_PATH = ROOT / "docs" / "config.md"

# Only `config_version` is not declared with option(); everything else has its own help.
_CONFIG_VERSION_HELP = (
    "Version of the config format. Geodesic writes it into every saved config and migrates "
    "files of older versions when loading them; a file without it is read as the current version."
)

_SCALARS = {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "null"}
_BOUNDS = (
    ("ge", ">= {}"),
    ("gt", "> {}"),
    ("le", "<= {}"),
    ("lt", "< {}"),
    ("multiple_of", "multiple of {}"),
    ("min_length", "length >= {}"),
    ("max_length", "length <= {}"),
)


@dataclass(frozen=True)
class FieldDoc:
    key: str
    type: str
    default: str
    bounds: str
    gui: str
    help: str


@dataclass(frozen=True)
class SectionDoc:
    key: str  # "" for the top level
    doc: str  # Markdown
    fields: list[FieldDoc]
    tag: str = ""  # the family, for a family's own section


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field (`LoRAConfig`), or None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Tag -> section of a discriminated union (`model`: one section per family)."""
    members = {}
    for arg in typing.get_args(annotation):
        tag = next((m.tag for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)), None)
        section = section_model(typing.get_args(arg)[0]) if tag is not None else None
        if section is not None:
            members[tag] = section
    return members


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The section class of the items of a list field (`list[ConceptConfig]`)."""
    if typing.get_origin(annotation) is list:
        return section_model(typing.get_args(annotation)[0])
    return None


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if origin is Literal:
        return "one of " + ", ".join(f"`{json.dumps(arg)}`" for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_name(arg) for arg in args) + "]"
    if origin is dict or section_model(annotation) is not None:
        return "object"
    return str(annotation)


def bounds_text(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, template in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(template.format(value))
    return " and ".join(parts)


def gui_text(info: FieldInfo) -> str:
    place = gui_place(info)
    if place is None:
        return ""
    advanced = ", advanced" if place.advanced else ""
    when = " and ".join(
        f"{name} is {' or '.join(json.dumps(v) for v in values)}"
        for name, values in place.applies_when
    )
    shown = f", shown when {when}" if when else ""
    return f'"{place.label}" on the {place.tab} tab{advanced}{shown}'


def field_doc(key: str, info: FieldInfo, default: Any) -> FieldDoc:
    help_text = info.description or (_CONFIG_VERSION_HELP if key == "config_version" else "")
    item = list_item_model(info.annotation)
    return FieldDoc(
        key=key,
        type=f"list of objects (keys under `{key}.<i>`)" if item else type_name(info.annotation),
        default=json.dumps(default),
        bounds=bounds_text(info),
        gui=gui_text(info),
        help=help_text,
    )


def collect(
    model: type[BaseModel],
    defaults: dict[str, Any],
    prefix: str = "",
    doc: str = "",
    *,
    tag: str = "",
) -> list[SectionDoc]:
    """The section at `prefix` (its plain fields), then its sub-sections, depth first.

    Defaults come from a default instance, not from the field declarations, because a section may
    have different defaults where it is used (text encoders do not train by default).
    """
    fields: list[FieldDoc] = []
    subsections: list[SectionDoc] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = section_model(info.annotation)
        if sub is not None:
            part_doc = html.escape(info.description or "", quote=False)
            subsections += collect(sub, defaults[name], f"{key}.", part_doc, tag=tag)
            continue
        members = union_members(info.annotation)
        if members:
            for family, member in members.items():
                member_doc = (
                    f"With `{key}.family` = `{json.dumps(family)}`: "
                    + html.escape(member.__doc__ or "", quote=False).strip()
                )
                member_defaults = member().model_dump(mode="json")
                subsections += collect(member, member_defaults, f"{key}.", member_doc, tag=family)
            continue
        fields.append(field_doc(key, info, defaults[name]))
        item = list_item_model(info.annotation)
        if item is not None:
            item_defaults = item().model_dump(mode="json")
            item_doc = f"Each item of the `{key}` list; `<i>` is its index, counted from 0."
            subsections += collect(item, item_defaults, f"{key}.<i>.", item_doc)
    doc = doc or html.escape(model.__doc__ or "", quote=False)
    return [SectionDoc(prefix.removesuffix("."), doc, fields, tag), *subsections]


def render() -> str:
    """The whole Markdown reference."""
    defaults = TrainConfig().model_dump(mode="json")
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python scripts/config_reference.py --write` from "
        "modules/config/schema.py; do not edit by hand. -->",
        "",
        "A training config is a JSON object. Every key is optional: a preset or config file "
        "only needs the keys it changes, and all others take the defaults below. Any key can "
        "also be set on the command line with `--set KEY=VALUE`, for example "
        "`--set lora.rank=32` or `--set sampling.prompts='[\"a photo of sks dog\"]'`; values "
        "are read as JSON, or as plain text when they are not valid JSON.",
        "",
        f"The current `config_version` is {CONFIG_VERSION}.",
    ]
    for section in collect(TrainConfig, defaults):
        if not section.fields:
            continue
        title = f"`{section.key}`" if section.key else "Top level"
        if section.tag:
            title += f" ({section.tag})"
        lines += ["", f"## {title}"]
        if section.doc:
            lines += ["", section.doc]
        for field in section.fields:
            anchor = f" ({section.tag})" if section.tag else ""
            lines += ["", f"### `{field.key}`{anchor}", ""]
            if field.help:
                lines += [html.escape(field.help, quote=False), ""]
            lines.append(f"- Type: {field.type}")
            lines.append(f"- Default: `{field.default}`")
            if field.bounds:
                lines.append(f"- Allowed: {field.bounds}")
            if field.gui:
                lines.append(f"- GUI: {field.gui}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {DOCS_PATH.relative_to(ROOT)}")
    action.add_argument(
        "--check", action="store_true", help="exit 1 if the written reference is out of date"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        atomic_write_text(DOCS_PATH, text)
        print(f"wrote {DOCS_PATH.relative_to(ROOT)}")
    elif args.check:
        current = DOCS_PATH.read_text(encoding="utf-8") if DOCS_PATH.exists() else ""
        if current != text:
            print(
                f"{DOCS_PATH.relative_to(ROOT)} is out of date; "
                "run python scripts/config_reference.py --write",
                file=sys.stderr,
            )
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
