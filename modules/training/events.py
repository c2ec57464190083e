"""What a run tells whoever watches it, and what it can be asked to do between steps.

The CLI watches through the progress bar and ignores both; the GUI passes an event sink (the
events are small picklable records, so they can cross a process boundary) and a command queue
that the loop reads at every optimizer-step boundary. Commands are for single-process runs: with
several processes only the main one would obey them.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Phase:
    """What the run is busy with before and after the steps ("loading the base model")."""

    text: str


@dataclass(frozen=True)
class Notice:
    """A line the CLI prints too (the data report, what is trained for how many steps)."""

    text: str


@dataclass(frozen=True)
class Started:
    """The step loop begins; `step` > 0 when resumed from a backup."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class StepDone:
    step: int
    total_steps: int
    epoch: int  # counted from 1
    loss: float | None  # None when the step was not finite
    smoothed_loss: float | None
    learning_rate: float  # of the first parameter group (the denoiser)
    seconds_per_step: float  # smoothed
    eta_seconds: float


@dataclass(frozen=True)
class SamplesWritten:
    step: int
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ValidationMeasured:
    step: int
    loss: float


@dataclass(frozen=True)
class BackupWritten:
    step: int
    path: Path


@dataclass(frozen=True)
class LoRASaved:
    step: int
    path: Path
    final: bool


RunEvent = (
    Phase
    | Notice
    | Started
    | StepDone
    | SamplesWritten
    | ValidationMeasured
    | BackupWritten
    | LoRASaved
)
EventSink = Callable[[RunEvent], None]


def ignore(event: RunEvent) -> None:
    """The sink of runs nobody watches."""


class Command(Enum):
    STOP = "stop"  # end after this step; writes a backup when backup.on_interrupt is on
    SAMPLE = "sample"  # sample now, with the sampling settings
    BACKUP = "backup"  # write a backup now


class RunCommands:
    """Commands queued from any thread (or, given a multiprocessing queue as `source`, from
    another process), taken by the loop at step boundaries, in order."""

    def __init__(self, source: Any = None) -> None:
        self._queue = source if source is not None else queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def take(self) -> list[Command]:
        taken = []
        while True:
            try:
                taken.append(self._queue.get_nowait())
            except queue.Empty:
                return taken
