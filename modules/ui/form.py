"""The config being edited: what every input holds, which fields apply, and what is wrong.

The form keeps the config as its JSON with each editable leaf replaced by its input's value
(text, or a bool), so a half-typed number survives until it is fixed. `raw()` turns it back
into the JSON the config loader validates, and `issues()` are the loader's own messages (the
lines the CLI prints) plus the GUI's check that declared paths exist, each tied to the field it
marks. Views subscribe to changes; nothing here knows a toolkit.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.config.fields import empty_message
from modules.config.loading import ConfigError, load_config
from modules.config.schema import TrainConfig
from modules.models.registry import FAMILIES
from modules.ui.fields import FieldSpec, Kind, ListSpec, Spec, form_fields, key_of

FAMILY_KEY = "model.family"  # the discriminator of the model section: changing it swaps sections


@dataclass(frozen=True)
class Issue:
    """A problem that refuses Start: the field it marks ("" for none) and the CLI's line."""

    key: str
    message: str
    tab: str | None = None
    start_only: bool = False  # a required field left empty: the config reads, a run cannot start


@dataclass(frozen=True)
class FormChange:
    """What changed: `keys` (None = every value, as after loading) and whether the set of
    fields itself changed (another family, a concept added or removed)."""

    keys: frozenset[str] | None
    structure: bool = False


Listener = Callable[[FormChange], None]


class ConfigForm:
    def __init__(self, config: TrainConfig | None = None) -> None:
        self._listeners: list[Listener] = []
        self._toggle_choice: dict[str, str] = {}  # a toggle's method, kept while it is off
        self._issues: list[Issue] | None = None
        self._config: TrainConfig | None = None
        self.load(config or TrainConfig())

    # -- structure ------------------------------------------------------------------------------

    @property
    def family(self) -> str:
        return self._doc["model"]["family"]

    @property
    def specs(self) -> list[Spec]:
        """The top-level specs (list fields as ListSpec), in schema order."""
        return self._specs

    def fields(self) -> list[FieldSpec]:
        """Every editable leaf, list items included."""
        found: list[FieldSpec] = []
        for spec in self._specs:
            if isinstance(spec, ListSpec):
                for index in range(self.count(spec.key)):
                    found += spec.item_fields(index)
            else:
                found.append(spec)
        return found

    def spec(self, key: str) -> FieldSpec:
        return self._by_key[key]

    def list_spec(self, key: str) -> ListSpec:
        return next(s for s in self._specs if isinstance(s, ListSpec) and s.key == key)

    def tab_specs(self, tab: str) -> list[Spec]:
        """A tab's specs: its sections' fields in schema order, then the per-part settings."""
        on_tab = [spec for spec in self._specs if spec.tab == tab]
        plain = [s for s in on_tab if not (isinstance(s, FieldSpec) and s.part is not None)]
        return plain + [s for s in on_tab if s not in plain]

    def tabs(self) -> list[str]:
        return list(dict.fromkeys(spec.tab for spec in self._specs))

    # -- values ---------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        return _at(self._doc, self._by_key[key].path)

    def set(self, key: str, value: Any) -> None:
        spec = self._by_key[key]
        if self.get(key) == value:
            return
        if key == FAMILY_KEY:
            self._switch_family(value)
            return
        _put(self._doc, spec.path, value)
        self._changed(FormChange(frozenset({key})))

    def ticked(self, key: str) -> bool:
        toggle = self._by_key[key].toggle
        return toggle is not None and self.get(key) != toggle.off

    def tick(self, key: str, on: bool) -> None:
        """Tick or untick a toggle: ticked takes the last chosen method (the declared one first)."""
        toggle = self._by_key[key].toggle
        if toggle is None:
            raise KeyError(f"{key} is not a toggle")
        if self.ticked(key):
            self._toggle_choice[key] = self.get(key)
        self.set(key, self._toggle_choice.get(key, toggle.on) if on else toggle.off)

    def applies(self, key: str) -> bool:
        """Whether the field means something with its siblings' current values."""
        spec = self._by_key[key]
        if not spec.place.applies_when:
            return True
        parent = spec.path[:-1]
        siblings = {
            name: self._raw_value(key_of((*parent, name))) for name, _ in spec.place.applies_when
        }
        return spec.place.applies(siblings)

    def _raw_value(self, key: str) -> Any:
        spec = self._by_key.get(key)
        return spec.to_raw(self.get(key)) if spec else None

    # -- lists ----------------------------------------------------------------------------------

    def count(self, list_key: str) -> int:
        return len(_at(self._doc, self.list_spec(list_key).path))

    def add_item(self, list_key: str, **values: Any) -> int:
        """Append an item with its defaults (and `values`, raw); returns its index."""
        spec = self.list_spec(list_key)
        items = _at(self._doc, spec.path)
        items.append({**spec.item_default(), **values})
        index = len(items) - 1
        for field in spec.item_fields(index):
            _put(self._doc, field.path, field.to_widget(_at(self._doc, field.path)))
        self._restructure()
        return index

    def remove_item(self, list_key: str, index: int) -> None:
        del _at(self._doc, self.list_spec(list_key).path)[index]
        self._restructure()

    def item_has_issue(self, list_key: str, index: int) -> bool:
        prefix = f"{list_key}.{index}."
        return any(issue.key.startswith(prefix) for issue in self.issues())

    # -- the whole config -----------------------------------------------------------------------

    def load(self, config: TrainConfig) -> None:
        """Show `config` (every value replaced)."""
        self._doc = config.model_dump(mode="json")
        self._specs = form_fields(self._doc["model"]["family"])
        self._index()
        for spec in self._by_key.values():
            _put(self._doc, spec.path, spec.to_widget(_at(self._doc, spec.path)))
        self._changed(FormChange(None, structure=True))

    def raw(self) -> dict[str, Any]:
        """The config as the JSON the loader reads (inputs turned back into values)."""
        raw = copy.deepcopy(self._doc)
        for spec in self._by_key.values():
            _put(raw, spec.path, spec.to_raw(_at(self._doc, spec.path)))
        return raw

    def config(self) -> TrainConfig:
        """The validated config; ConfigError with the CLI's message when something is invalid."""
        if self._config is None:
            self._config = load_config(raw=self.raw())
        return self._config

    def issues(self, *, fresh: bool = False) -> list[Issue]:
        """Everything that refuses Start, in field order where a field is known. Kept until the
        next edit; `fresh` looks at the disk again (folders may have appeared meanwhile)."""
        if self._issues is None or fresh:
            self._issues = self._check()
        return self._issues

    def issues_by_key(self) -> dict[str, list[str]]:
        marked: dict[str, list[str]] = {}
        for issue in self.issues():
            marked.setdefault(issue.key, []).append(issue.message)
        return marked

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- inside ---------------------------------------------------------------------------------

    def _check(self) -> list[Issue]:
        issues: list[Issue] = []
        try:
            self.config()
        except ConfigError as error:
            if error.issues:
                issues += [self._issue(i.key, i.message) for i in error.issues]
            else:
                issues.append(Issue("", str(error)))
        for spec in self._by_key.values():
            value = spec.to_raw(self.get(spec.key))
            message = _missing_path(spec, value)
            if message:
                issues.append(Issue(spec.key, message, spec.tab))
            message = _empty_required(spec, value)
            if message:
                issues.append(Issue(spec.key, message, spec.tab, start_only=True))
        order = {key: n for n, key in enumerate(self._by_key)}
        return sorted(issues, key=lambda i: order.get(i.key, len(order)))

    def _issue(self, key: str, message: str) -> Issue:
        """Tie a loader message to the field it is about: its key, the nearest field above it
        (`data.extra_resolutions.1`), else the first field the message names."""
        parts = key.split(".") if key else []
        while parts:
            found = self._by_key.get(".".join(parts))
            if found is not None:
                return Issue(found.key, message, found.tab)
            parts.pop()
        for named in re.findall(r"[a-z_0-9]+(?:\.[a-z_0-9]+)+", message):
            found = self._by_key.get(named)
            if found is not None:
                return Issue(found.key, message, found.tab)
        return Issue("", message)

    def _switch_family(self, family: str) -> None:
        """Another family's model section with its own defaults (its parts differ); a choice the
        family narrows (the output format) changes only when the family does not take it."""
        section_class = FAMILIES[family][0]
        self._doc["model"] = section_class().model_dump(mode="json")
        self._specs = form_fields(family)
        self._index()
        for spec in self._by_key.values():
            if spec.path[0] == "model":
                _put(self._doc, spec.path, spec.to_widget(_at(self._doc, spec.path)))
        for key, allowed in section_class.narrowed_choices().items():
            path = self._by_key[key].path
            if _at(self._doc, path) not in allowed:
                _put(self._doc, path, allowed[0])
        self._changed(FormChange(None, structure=True))

    def _restructure(self) -> None:
        self._index()
        self._changed(FormChange(None, structure=True))

    def _index(self) -> None:
        self._by_key = {spec.key: spec for spec in self.fields()}

    def _changed(self, change: FormChange) -> None:
        self._issues = None
        self._config = None
        for listener in list(self._listeners):
            listener(change)


def _empty_required(spec: FieldSpec, value: Any) -> str | None:
    """For a declared required path left empty: the run's own message."""
    declared = spec.path_input
    if spec.kind is not Kind.PATH or declared is None or not declared.required:
        return None
    if isinstance(value, str) and value.strip():
        return None
    return empty_message(spec.key, declared.required)


def _missing_path(spec: FieldSpec, value: Any) -> str | None:
    """For a declared must-exist path: the message (worded as the run's own checks) when a
    non-empty value names nothing on disk."""
    declared = spec.path_input
    if spec.kind is not Kind.PATH or declared is None or not declared.must_exist:
        return None
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    exists = {"folder": path.is_dir, "file": path.is_file, "file_or_folder": path.exists}
    if exists[declared.kind]():
        return None
    what = "file or folder" if declared.kind == "file_or_folder" else declared.kind
    return f"{spec.key}: {what} {str(path)!r} does not exist"


def _at(doc: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _put(doc: Any, path: tuple[str | int, ...], value: Any) -> None:
    _at(doc, path[:-1])[path[-1]] = value
