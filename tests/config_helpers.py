"""Loading a config file the way the tests of its errors need: every line of an error names the
file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import ConfigError, load_config


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def config_error(path: Path, **kwargs: Any) -> ConfigError:
    """Load `path` expecting a ConfigError whose every line names the file."""
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    message = str(info.value)
    assert message, "empty error message"
    for line in message.splitlines():
        assert line.startswith(f"{path}: "), f"line does not name the file: {line!r}"
    return info.value


def error_text(path: Path, raw: Any) -> str:
    """The message of loading `raw` from a file, without the file prefix (single line)."""
    write_json(path, raw)
    message = str(config_error(path))
    assert "\n" not in message, message
    return message.removeprefix(f"{path}: ")
