"""The process a GUI run (or a data scan, or a memory estimate) lives in: it trains exactly as
the CLI does.

Training runs in its own process rather than a thread of the window's: the window stays
responsive whatever the run does with the interpreter lock, a crash or an out-of-memory kill
cannot take the window down, GPU memory goes back to the system when a run ends, and every run
starts from fresh process state. Events go back through a multiprocessing queue; errors arrive
as the CLI's one-line messages.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class Job:
    kind: Literal["train", "scan", "estimate"]
    config_json: str  # the validated config, as Export writes it
    resume: bool = False  # continue from the newest backup in the workspace


@dataclass(frozen=True)
class Finished:
    steps: int
    interrupted: bool  # stopped early (a backup was written when backup.on_interrupt is on)
    output: Path | None  # the final LoRA, when the run finished
    last_backup: Path | None


@dataclass(frozen=True)
class Failed:
    message: str  # the CLI's one-line message
    exit_code: int  # what the CLI would exit with: 2 bad input, 1 the run could not go on
    unexpected: bool = False  # a bug rather than bad input; the traceback went to the console


@dataclass(frozen=True)
class Report:
    """What a scan or an estimate found, as lines for people."""

    lines: tuple[str, ...]


def run_job(job: Job, events: Any, commands: Any) -> None:
    """Entry point of the child process: run `job`, report through `events`, obey `commands`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from modules.util.library_notices import quiet_library_notices

        quiet_library_notices()
        events.put(_run(job, events, commands))
    except Exception as error:  # every ending must reach the window
        from modules.errors import RunError, UserError

        if isinstance(error, (UserError, RunError)):
            events.put(Failed(str(error), error.exit_code))
        else:
            traceback.print_exc()
            events.put(Failed(f"unexpected error: {type(error).__name__}: {error}", 1, True))
    finally:
        events.close()
        events.join_thread()


def _run(job: Job, events: Any, commands: Any) -> Finished | Report:
    from modules.config.loading import load_config
    from modules.training.events import RunCommands

    config = load_config(raw=json.loads(job.config_json))
    if job.kind == "scan":
        return Report(tuple(scan_report(config)))
    if job.kind == "estimate":
        from modules.training.memory_preview import memory_estimate_lines

        return Report(tuple(memory_estimate_lines(config)))
    from modules.training.trainer import TrainingRun

    run = TrainingRun(config, resume_latest=job.resume, on_event=events.put)
    result = run.run(commands=RunCommands(commands))
    return Finished(
        steps=result.steps,
        interrupted=result.interrupted,
        output=None if result.interrupted else result.paths.output,
        last_backup=result.last_backup,
    )


def scan_report(config: Any) -> list[str]:
    """The data report the CLI prints before training (images, skipped files, buckets)."""
    from modules.data.pipeline import DataPipeline
    from modules.models.registry import get_family

    family = get_family(config.model.family)
    return DataPipeline(config, latent_multiple=family.latent_multiple).report_lines()
