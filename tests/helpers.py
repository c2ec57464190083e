"""Small builders shared by the training tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from modules.config.schema import TrainConfig
from modules.training.stop import StopSignal
from modules.training.trainer import TrainingRun, train

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


@dataclass(frozen=True)
class TinyModel:
    """A tiny base model of one family and the `model` settings its tests train it with."""

    family: str
    path: Path
    model: dict[str, Any]

    def config(self, data_path: Path, workspace: Path, **sections: dict[str, Any]) -> dict:
        """`tiny_config` for this model; a `model` section is merged over the family's."""
        sections = {**sections, "model": {**self.model, **sections.get("model", {})}}
        return tiny_config(self.path, data_path, workspace, **sections)

    def rebuilt(self, path: Path, *, seed: int) -> Path:
        """Another tiny model of this family (other weights) in folder `path`."""
        if self.family == "flux":
            from modules.models.flux.tiny import build_tiny_flux

            return build_tiny_flux(path, seed=seed)
        from modules.models.sdxl.tiny import build_tiny_sdxl

        return build_tiny_sdxl(path, seed=seed)


def free_port() -> int:
    """A TCP port nothing listens on now, for a multi-process launch's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def default_sigint() -> None:
    """For a child's preexec_fn: Ctrl-C at its default, as a user's terminal starts the CLI. An
    ignored SIGINT is inherited through exec, and Python then leaves it ignored; a shell
    without job control starts background commands (`make test &`) with SIGINT ignored, so
    the test process may hold it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_cli(
    *args: str,
    launcher: tuple[str, ...] = (sys.executable,),
    timeout: float = 300,
    preexec_fn: Callable[[], None] | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run scripts/train.py as a user would (optionally through a launcher such as accelerate;
    `preexec_fn` sets up a fault in the child, e.g. a disk that fills)."""
    return subprocess.run(
        [*launcher, str(REPO / "scripts" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**env),
        cwd=REPO,
        preexec_fn=preexec_fn,
    )


class StopAtStep(StopSignal):
    """Requests a stop once the run reaches `step`, like a Ctrl-C at that moment."""

    def __init__(self, run: TrainingRun, step: int) -> None:
        super().__init__()
        self.run, self.step = run, step

    @property
    def requested(self) -> bool:
        return self.run.state.progress.step >= self.step

    @requested.setter
    def requested(self, value: bool) -> None:
        """Ignored: the run, not a signal handler, decides when this stop is requested."""


def straight_and_resumed(
    make_config: Callable[[Path], TrainConfig], root: Path, *, stop_at: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Final LoRA weights of an uninterrupted run and of one stopped at `stop_at`, then resumed.

    `make_config(workspace)` builds the same config for a given workspace folder.
    """
    straight = train(make_config(root / "straight"))
    config = make_config(root / "stopped")
    run = TrainingRun(config)
    result = run.run(StopAtStep(run, stop_at))
    assert result.interrupted and result.steps == stop_at
    resumed = train(config, resume_latest=True)
    assert not resumed.interrupted
    return load_file(straight.paths.output), load_file(resumed.paths.output)
