"""Run control for the window: start a run in its worker process, send it commands, and turn its
events into the progress the window shows. Toolkit-free: the view calls `poll()` from its own
event loop (Tk's `after`), so every widget update happens on the GUI thread.
"""

from __future__ import annotations

import datetime
import multiprocessing
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modules.config.loading import config_to_json
from modules.config.schema import TrainConfig
from modules.training.events import (
    BackupWritten,
    Command,
    LoRASaved,
    Notice,
    Phase,
    SamplesWritten,
    Started,
    StepDone,
    ValidationMeasured,
)
from modules.ui.worker import Failed, Finished, Job, Report, run_job

# what the worker imports before its first job, once per session (Linux: a fork server holds them)
PRELOAD = ["modules.training.trainer"]


@dataclass(frozen=True)
class Cancelled:
    """The run was stopped before its first step (nothing to back up)."""


def worker_context() -> multiprocessing.context.BaseContext:
    """Linux: a fork server that has imported torch and the trainer once, so every later run
    starts at once; elsewhere a fresh interpreter per run (fork is unsafe with GUI toolkits)."""
    if sys.platform.startswith("linux"):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


class Worker:
    """One job in a child process: its events, its commands and how it ended.

    The process is started from a helper thread: with a fork server, the first start waits until
    the server has imported torch and the trainer, which must not freeze the window.
    """

    def __init__(self, job: Job, context: multiprocessing.context.BaseContext) -> None:
        self.kind = job.kind
        self.events = context.Queue()
        self.commands = context.Queue()
        # not a daemon: the run's data loader starts processes of its own
        self.process = context.Process(
            target=run_job, args=(job, self.events, self.commands), name=f"geodesic-{job.kind}"
        )
        self.ended = False
        self.cancelled = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        threading.Thread(target=self._start, name=f"start-{job.kind}", daemon=True).start()

    def _start(self) -> None:
        try:
            if not self.cancelled:
                self.process.start()
                if self.cancelled:  # cancelled while starting (see cancel)
                    self.process.terminate()
        except Exception as error:  # e.g. out of memory for a new process
            self._start_error = error
        finally:
            self._started.set()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self._started.is_set() else None

    def send(self, command: Command) -> None:
        self.commands.put(command)

    def cancel(self) -> None:
        """End the process now (before the first step there is nothing to back up). The flag is
        set before the process is looked at, and the starter looks at the flag after starting,
        so one of the two terminates it however they interleave."""
        self.cancelled = True
        if self.process.pid is not None:
            self.process.terminate()

    def wait(self, timeout: float | None = None) -> None:
        if self._started.wait(timeout) and self.process.pid is not None:
            self.process.join(timeout)

    def gone(self) -> bool:
        """Started (or given up) and no longer running: nothing left to wait for."""
        if not self._started.is_set():
            return False
        return self.process.pid is None or not self.process.is_alive()

    def drain(self) -> list[Any]:
        """Events that arrived; a final Failed/Cancelled when the process ended without one."""
        if not self._started.is_set():
            return []
        if self.process.pid is None:  # never started: cancelled first, or it could not start
            self.ended = True
            if self.cancelled:
                return [Cancelled()]
            return [Failed(f"cannot start the {self.kind} process: {self._start_error}", 1, True)]
        alive = self.process.is_alive()  # before draining: a dead process has sent everything
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except (queue.Empty, EOFError, OSError):
                break
        if any(isinstance(e, (Finished, Failed, Report)) for e in events):
            self.ended = True
        elif not alive and not self.ended:
            self.ended = True
            if self.cancelled:
                events.append(Cancelled())
            else:
                code = self.process.exitcode
                events.append(
                    Failed(
                        f"the {self.kind} process ended unexpectedly (exit code {code})", 1, True
                    )
                )
        return events


def warm_up(context: multiprocessing.context.BaseContext) -> None:
    """Have the fork server import torch and the trainer now, in the background, so the first
    Start does not wait for it (nothing to do where each run is a fresh interpreter)."""
    if context.get_start_method() != "forkserver":
        return

    def start_nothing() -> None:
        process = context.Process(target=_nothing, name="geodesic-warm-up")
        process.start()
        process.join()

    threading.Thread(target=start_nothing, name="warm-up", daemon=True).start()


def _nothing() -> None:
    """The warm-up process's job."""


class _Reaper:
    """Ended workers whose processes are still exiting (interpreter teardown takes a moment):
    joined once they are gone, never by blocking the GUI thread."""

    def __init__(self) -> None:
        self.exiting: list[Worker] = []

    def add(self, worker: Worker) -> None:
        self.exiting.append(worker)
        self.reap()

    def reap(self) -> None:
        for worker in list(self.exiting):
            if worker.gone():
                if worker.process.pid is not None:
                    worker.process.join()
                self.exiting.remove(worker)


@dataclass
class RunProgress:
    """Everything the run panel shows, updated from the run's events."""

    state: str = "idle"  # idle, preparing, training, stopping, finished, stopped, failed
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    learning_rate: float | None = None
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    smoothed_losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: tuple[Path, ...] = ()
    samples_step: int | None = None
    last_backup: Path | None = None
    output: Path | None = None
    notices: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def apply(self, event: Any) -> None:
        if isinstance(event, Phase):
            self.phase = event.text
        elif isinstance(event, Notice):
            self.notices.append(event.text)
        elif isinstance(event, Started):
            self.state, self.phase = "training", "training"
            self.step, self.total_steps = event.step, event.total_steps
        elif isinstance(event, StepDone):
            self._step(event)
        elif isinstance(event, SamplesWritten):
            self.samples, self.samples_step = event.paths, event.step
        elif isinstance(event, ValidationMeasured):
            self.validation_losses.append((event.step, event.loss))
        elif isinstance(event, BackupWritten):
            self.last_backup = event.path
        elif isinstance(event, LoRASaved) and event.final:
            self.output = event.path
        elif isinstance(event, Finished):
            self.state = "stopped" if event.interrupted else "finished"
            self.phase = ""
            self.last_backup = event.last_backup or self.last_backup
        elif isinstance(event, Failed):
            self.state, self.phase, self.error = "failed", "", event.message
        elif isinstance(event, Cancelled):
            self.state, self.phase = "stopped", ""

    def _step(self, event: StepDone) -> None:
        self.step, self.total_steps, self.epoch = event.step, event.total_steps, event.epoch
        self.loss, self.smoothed_loss = event.loss, event.smoothed_loss
        self.learning_rate = event.learning_rate
        self.seconds_per_step, self.eta_seconds = event.seconds_per_step, event.eta_seconds
        if event.loss is not None:
            self.losses.append((event.step, event.loss))
        if event.smoothed_loss is not None:
            self.smoothed_losses.append((event.step, event.smoothed_loss))

    def summary(self) -> str:
        """ "step 12/60 · loss 0.1234 · lr 1.00e-04 · 0.52 s/it · ETA 0:00:25"."""
        parts = [f"step {self.step}/{self.total_steps}" if self.total_steps else "step -"]
        if self.smoothed_loss is not None:
            parts.append(f"loss {self.smoothed_loss:.4f}")
        if self.learning_rate is not None:
            parts.append(f"lr {self.learning_rate:.2e}")
        if self.seconds_per_step is not None:
            parts.append(f"{self.seconds_per_step:.2f} s/it")
        if self.eta_seconds is not None and self.state == "training":
            parts.append(f"ETA {datetime.timedelta(seconds=round(self.eta_seconds))}")
        return " · ".join(parts)


class RunController:
    """One training run at a time, in a worker process."""

    def __init__(self, context: multiprocessing.context.BaseContext | None = None) -> None:
        self.context = context or worker_context()
        self.progress = RunProgress()
        self._worker: Worker | None = None
        self._reaper = _Reaper()

    @property
    def running(self) -> bool:
        return self._worker is not None

    @property
    def pid(self) -> int | None:
        """The worker process's id while a run is in progress (None until it has started)."""
        return self._worker.pid if self._worker is not None else None

    def start(self, config: TrainConfig, *, resume: bool = False) -> None:
        if self.running:
            raise RuntimeError("a run is already in progress")
        self.progress = RunProgress(state="preparing", phase="starting the training process")
        self._worker = Worker(Job("train", config_to_json(config), resume), self.context)

    def stop(self) -> None:
        """Stop at the next step boundary (a backup follows); before the first step, or when
        asked a second time (like a second Ctrl-C), at once."""
        if self._worker is None:
            return
        if self.progress.state == "training":
            self._worker.send(Command.STOP)
            self.progress.state, self.progress.phase = "stopping", "stopping after this step"
        else:
            self._worker.cancel()

    def sample_now(self) -> None:
        if self._worker is not None:
            self._worker.send(Command.SAMPLE)

    def backup_now(self) -> None:
        if self._worker is not None:
            self._worker.send(Command.BACKUP)

    def poll(self) -> list[Any]:
        """Apply the events that arrived since the last call and return them."""
        self._reaper.reap()
        if self._worker is None:
            return []
        events = self._worker.drain()
        for event in events:
            self.progress.apply(event)
        if self._worker.ended:
            self._reaper.add(self._worker)
            self._worker = None
        return events

    def wait(self, timeout: float | None = None) -> None:
        """Block until the worker process ends (closing the window)."""
        if self._worker is not None:
            self._worker.wait(timeout)


class BackgroundReport:
    """A report on the current config made in a worker process (the window stays responsive):
    `scan`, the data report the CLI prints; `estimate`, the memory estimate it prints."""

    def __init__(
        self,
        kind: Literal["scan", "estimate"],
        context: multiprocessing.context.BaseContext | None = None,
    ) -> None:
        self.kind = kind
        self.context = context or worker_context()
        self.lines: list[str] = []
        self.error: str | None = None
        self._worker: Worker | None = None
        self._reaper = _Reaper()

    @property
    def running(self) -> bool:
        return self._worker is not None

    def start(self, config: TrainConfig) -> None:
        self.cancel()
        self.lines, self.error = [], None
        self._worker = Worker(Job(self.kind, config_to_json(config)), self.context)

    def cancel(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._reaper.add(self._worker)
            self._worker = None

    def poll(self) -> bool:
        """True when the report ended during this call."""
        self._reaper.reap()
        if self._worker is None:
            return False
        for event in self._worker.drain():
            if isinstance(event, Report):
                self.lines = list(event.lines)
            elif isinstance(event, Failed):
                self.error = event.message
        if self._worker.ended:
            self._reaper.add(self._worker)
            self._worker = None
            return True
        return False
