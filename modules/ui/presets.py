"""Presets as the GUI offers them: the built-ins in training_presets/ and the user's own folder.

A saved preset is sparse, like the built-ins: only what differs from the defaults (plus the
config version and the model family), so it reads like a hand-written preset and loads through
the same `load_config` as every other file. Export writes the whole resolved config instead.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.config.loading import load_config, read_json
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.util.atomic import atomic_write_text

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "training_presets"
USER_DIR_VARIABLE = "GEODESIC_PRESETS_DIR"


def user_presets_dir() -> Path:
    """$GEODESIC_PRESETS_DIR, else the platform's per-user config folder."""
    if os.environ.get(USER_DIR_VARIABLE):
        return Path(os.environ[USER_DIR_VARIABLE]).expanduser()
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "Geodesic" / "presets"
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "geodesic" / "presets"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    builtin: bool

    @property
    def title(self) -> str:
        """How the dropdown shows it: user presets are marked, so the two never look alike."""
        return self.name if self.builtin else f"{self.name} (yours)"


class PresetLibrary:
    def __init__(self, *, builtin_dir: Path = BUILTIN_DIR, user_dir: Path | None = None) -> None:
        self.builtin_dir = builtin_dir
        self.user_dir = user_dir if user_dir is not None else user_presets_dir()

    def presets(self) -> list[Preset]:
        """Built-ins first, then the user's, each sorted by name."""
        found = []
        for folder, builtin in ((self.builtin_dir, True), (self.user_dir, False)):
            if folder.is_dir():
                paths = sorted(folder.glob("*.json"), key=lambda p: p.stem.lower())
                found += [Preset(p.stem, p, builtin) for p in paths]
        return found

    def find(self, title: str) -> Preset:
        for preset in self.presets():
            if preset.title == title:
                return preset
        raise UserError(f"preset {title!r} not found in {self.builtin_dir} or {self.user_dir}")

    def load(self, preset: Preset) -> TrainConfig:
        return load_config(preset.path)

    def save(self, name: str, config: TrainConfig) -> Preset:
        """Write the user preset `name` (replacing one of that name); returns it."""
        name = name.strip()
        if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
            raise UserError(
                f"preset name {name!r}: use letters, digits, spaces, '-' or '_' (no path characters)"
            )
        path = self.user_dir / f"{name}.json"
        atomic_write_text(path, json.dumps(sparse(config), indent=2) + "\n")
        return Preset(name, path, builtin=False)

    def delete(self, preset: Preset) -> None:
        if preset.builtin:
            raise UserError(f"preset {preset.name!r} is built in; only your own can be deleted")
        preset.path.unlink(missing_ok=True)

    def read(self, preset: Preset) -> dict[str, Any]:
        return read_json(preset.path)


def sparse(config: TrainConfig) -> dict[str, Any]:
    """What differs from the defaults of a config of the same model family, with the config
    version and family always kept (so the file says what it is)."""
    full = config.model_dump(mode="json")
    family = config.model.family
    defaults = TrainConfig.model_validate({"model": {"family": family}}).model_dump(mode="json")
    kept = _difference(full, defaults)
    kept["config_version"] = full["config_version"]
    kept.setdefault("model", {})["family"] = family
    ordered = {key: kept[key] for key in full if key in kept}  # in schema order
    return ordered


def _difference(value: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for key, item in value.items():
        base = default.get(key)
        if isinstance(item, dict) and isinstance(base, dict):
            inner = _difference(item, base)
            if inner:
                changed[key] = inner
        elif item != base:
            changed[key] = item
    return changed
