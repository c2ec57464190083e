"""Small builders shared by the training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def tiny_config(
    model_path: Path, data_path: Path, workspace: Path, **sections: dict[str, Any]
) -> dict:
    """A raw config dict for a few fast steps on the tiny model; `sections` are merged in."""
    raw: dict[str, Any] = {
        "model": {"base_model": str(model_path)},
        "lora": {"rank": 4, "alpha": 4},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_steps": 4, "batch_size": 2, "seed": 7},
        "data": {"resolution": 64, "concepts": [{"path": str(data_path)}]},
        "sampling": {"prompts": [], "at_end": False},
        "output": {"workspace_dir": str(workspace), "name": "test-lora"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_cli(
    *args: str, launcher: tuple[str, ...] = (sys.executable,), timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run scripts/train.py as a user would (optionally through a launcher such as accelerate)."""
    return subprocess.run(
        [*launcher, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        cwd=REPO,
    )
