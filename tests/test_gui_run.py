"""Run control without a display: the trainer's events and commands, and runs in the worker
process as the window drives them (errors as the CLI's line, stop before the first step, a
crashed worker)."""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import load_config
from modules.errors import UserError
from modules.training.events import (
    BackupWritten,
    Command,
    LoRASaved,
    Notice,
    Phase,
    RunCommands,
    SamplesWritten,
    Started,
    StepDone,
)
from modules.training.trainer import TrainingRun
from modules.ui.run_control import Cancelled, RunController, RunProgress
from modules.ui.worker import Failed, Finished
from tests.helpers import TinyModel, tiny_config


def _tiny(model: Path, data: Path, workspace: Path, **sections: dict[str, Any]) -> Any:
    """The tests' tiny run, images read in the training process (no loader processes)."""
    raw = tiny_config(model, data, workspace, **sections)
    raw["data"]["workers"] = 0
    return load_config(raw=raw)


def _wait(controller: RunController, timeout: float = 240) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + timeout
    while controller.running:
        assert time.monotonic() < deadline, f"run did not end: {controller.progress}"
        events += controller.poll()
        time.sleep(0.05)
    return events


def test_run_reports_progress_and_obeys_commands(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Sample now and Backup now at step 1, Stop at step 2: each at that step boundary (the
    same events and commands for every family)."""
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        training={"max_steps": 5},
        sampling={"prompts": ["a red circle"], "steps": 2, "at_end": False},
    )
    raw["data"]["workers"] = 0
    config = load_config(raw=raw)
    events: list[Any] = []
    commands = RunCommands()

    def watch(event: Any) -> None:
        events.append(event)
        if isinstance(event, StepDone) and event.step == 2:
            commands.put(Command.STOP)

    commands.put(Command.SAMPLE)
    commands.put(Command.BACKUP)
    run = TrainingRun(config, on_event=watch)
    result = run.run(commands=commands)
    assert result.interrupted and result.steps == 2

    phases = [e.text for e in events if isinstance(e, Phase)]
    assert phases[:3] == [
        "scanning the data",
        "loading the base model",
        "filling the latent and text caches",
    ]
    notices = [e.text for e in events if isinstance(e, Notice)]
    assert notices[0].startswith("data: 4 images in 1 concept")
    assert any(n.startswith("memory estimate for a training step") for n in notices)
    assert notices[-1].startswith("training ") and "for 5 steps" in notices[-1]
    assert [e for e in events if isinstance(e, Started)] == [Started(step=0, total_steps=5)]
    steps = [e for e in events if isinstance(e, StepDone)]
    assert [s.step for s in steps] == [1, 2]
    for step in steps:
        assert step.total_steps == 5 and step.epoch == 1 and step.loss > 0
        assert step.learning_rate == pytest.approx(1e-3)
        assert step.seconds_per_step > 0
        assert step.eta_seconds == pytest.approx(step.seconds_per_step * (5 - step.step))
    (samples,) = [e for e in events if isinstance(e, SamplesWritten)]
    assert samples.step == 1 and [p.name for p in samples.paths] == ["00.png"]
    assert samples.paths[0].is_file()
    backups = [e for e in events if isinstance(e, BackupWritten)]
    assert [(b.step, b.path.name) for b in backups] == [(1, "step-000001"), (2, "step-000002")]
    assert all((b.path / "state.pt").is_file() for b in backups[1:])
    order = [type(e).__name__ for e in events if isinstance(e, (StepDone, SamplesWritten))]
    assert order == ["StepDone", "SamplesWritten", "StepDone"]
    assert not any(isinstance(e, LoRASaved) for e in events)


def test_progress_follows_the_events() -> None:
    progress = RunProgress(state="preparing")
    progress.apply(Phase("loading the base model"))
    assert progress.phase == "loading the base model" and progress.fraction == 0
    progress.apply(Started(step=2, total_steps=8))
    progress.apply(StepDone(3, 8, 1, 0.5, 0.45, 1e-4, 0.5, 2.5))
    progress.apply(StepDone(4, 8, 1, None, 0.45, 1e-4, 0.5, 2.0))
    assert (progress.state, progress.step, progress.fraction) == ("training", 4, 0.5)
    assert progress.losses == [(3, 0.5)] and progress.smoothed_losses == [(3, 0.45), (4, 0.45)]
    assert progress.summary() == "step 4/8 · loss 0.4500 · lr 1.00e-04 · 0.50 s/it · ETA 0:00:02"
    progress.apply(LoRASaved(8, Path("out.safetensors"), final=True))
    progress.apply(Finished(steps=8, interrupted=False, output=None, last_backup=None))
    assert progress.state == "finished" and progress.output == Path("out.safetensors")


def test_worker_errors_arrive_as_the_cli_line(tiny_dataset_path: Path, tmp_path: Path) -> None:
    config = _tiny(tmp_path / "no-such-model", tiny_dataset_path, tmp_path / "ws")
    with pytest.raises(UserError) as direct:
        TrainingRun(config)
    controller = RunController()
    controller.start(config)
    events = _wait(controller)
    assert events[-1] == Failed(str(direct.value), exit_code=2)
    assert controller.progress.state == "failed" and controller.progress.error == str(direct.value)


def test_stop_before_the_first_step_ends_the_worker_at_once(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    controller = RunController()
    controller.start(_tiny(tiny_sdxl_path, tiny_dataset_path, tmp_path))
    assert controller.progress.state == "preparing"
    controller.stop()
    events = _wait(controller, timeout=30)
    assert events[-1] == Cancelled() and controller.progress.state == "stopped"
    assert not (tmp_path / "backups").exists()


def test_a_worker_that_dies_is_reported(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    controller = RunController()
    controller.start(_tiny(tiny_sdxl_path, tiny_dataset_path, tmp_path))
    deadline = time.monotonic() + 120
    while controller.pid is None:  # started from a helper thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(controller.pid, signal.SIGKILL)
    events = _wait(controller, timeout=30)
    assert events[-1] == Failed(
        "the train process ended unexpectedly (exit code -9)", 1, unexpected=True
    )


class _SlowStart:
    """A process whose start takes a while, as the first start with a fork server does while
    the server imports torch; it then runs at once and reports an error."""

    def __init__(self, target: Any, args: tuple, name: str) -> None:
        self.events = args[1]
        self.pid: int | None = None
        self.exitcode: int | None = None

    def start(self) -> None:
        time.sleep(1.0)
        self.pid, self.exitcode = 1, 0
        self.events.put(Failed("model.base_model: not found", 2))

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


class _SlowContext:
    Queue = queue.Queue
    Process = _SlowStart


def test_start_does_not_wait_for_the_process_to_start(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    controller = RunController(context=_SlowContext())
    begun = time.monotonic()
    controller.start(_tiny(tiny_sdxl_path, tiny_dataset_path, tmp_path))
    assert time.monotonic() - begun < 0.5  # the window's thread is free meanwhile
    assert controller.running and controller.pid is None and controller.poll() == []
    events = _wait(controller, timeout=30)
    assert events == [Failed("model.base_model: not found", 2)]
