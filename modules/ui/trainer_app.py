"""The trainer window's state and actions without a toolkit: the form, presets, files, run
control and data scans. A view (modules/ui/ctk/) binds its widgets and buttons to this and holds
no training logic of its own, so another toolkit could show the same window.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from modules.config.loading import config_to_json, load_config, save_config
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.ui.form import ConfigForm, Issue
from modules.ui.presets import Preset, PresetLibrary
from modules.ui.run_control import BackgroundReport, RunController, warm_up

# Lines shown before Start for a valid config (e.g. a memory estimate): config -> lines.
NoteProvider = Callable[[TrainConfig], Iterable[str]]

# The tabs, in order, with their titles; fields name their tab in option(tab=...).
TABS = {
    "general": "General",
    "model": "Model",
    "data": "Data",
    "training": "Training",
    "lora": "LoRA",
    "sampling": "Sampling",
    "backup": "Backup",
}


class TrainerApp:
    def __init__(
        self,
        *,
        config: TrainConfig | None = None,
        presets: PresetLibrary | None = None,
        context: multiprocessing.context.BaseContext | None = None,
        estimate_memory: bool = True,
        estimate_delay: float = 1.0,
    ) -> None:
        self.form = ConfigForm(config)
        self.presets = presets or PresetLibrary()
        self.run = RunController(context)
        self.scan = BackgroundReport("scan", self.run.context)
        self.notes: list[NoteProvider] = []
        # the memory estimate of the config shown, made in a worker once the config has held
        # still for `estimate_delay` seconds (typing a number does not start one per key)
        self.estimate = BackgroundReport("estimate", self.run.context) if estimate_memory else None
        self.estimate_delay = estimate_delay
        self._estimate_wanted: tuple[str, TrainConfig] | None = None
        self._wanted_since = 0.0
        self._estimated: str | None = None  # the config (as JSON) the estimate shown is for
        self.preset: Preset | None = None  # the preset last loaded or saved

    # -- presets and files ----------------------------------------------------------------------

    def load_preset(self, title: str) -> None:
        preset = self.presets.find(title)
        self.form.load(self.presets.load(preset))
        self.preset = preset

    def save_preset(self, name: str) -> Preset:
        """Save the current config as the user's preset `name` (ConfigError if invalid)."""
        self.preset = self.presets.save(name, self.form.config())
        return self.preset

    def delete_preset(self, title: str) -> None:
        preset = self.presets.find(title)
        self.presets.delete(preset)
        if self.preset == preset:
            self.preset = None

    def load_file(self, path: str | Path) -> None:
        """Show a config or preset file (migrated and validated as the CLI does)."""
        self.form.load(load_config(path))
        self.preset = None

    def export(self, path: str | Path) -> None:
        """Write the whole config: `scripts/train.py --config-path` trains it identically."""
        save_config(self.form.config(), path)

    # -- running --------------------------------------------------------------------------------

    def problems(self) -> list[Issue]:
        """What refuses Start now (paths looked up again)."""
        return self.form.issues(fresh=True)

    def start(self, *, resume: bool = False) -> list[Issue]:
        """Start a run (or resume from the newest backup); returns the problems that refuse it."""
        problems = self.problems()
        if problems:
            return problems
        if self.run.running:
            return [Issue("", "a run is already in progress")]
        self.run.start(self.form.config(), resume=resume)
        return []

    def scan_data(self) -> list[Issue]:
        """Scan the concepts in the background (the report the CLI prints before training); the
        worker reads the whole config, so every problem refuses it as it refuses Start, except
        an empty base model, which the scan does not read."""
        problems = [problem for problem in self.problems() if not problem.start_only]
        if problems:
            return problems
        self.scan.start(self.form.config())
        return []

    def pre_start_lines(self) -> list[str]:
        """What the status area shows before Start: the problems, or the notes for this config."""
        problems = self.problems()
        if problems:
            count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
            return [f"{count} to fix before Start:", *(f"  {p.message}" for p in problems)]
        config = self.form.config()
        lines = [f"ready: {config.model.family}, saving to {config.output.workspace_dir}"]
        for provider in self.notes:
            try:
                lines += list(provider(config))
            except UserError as error:
                lines.append(str(error))
        return lines + self._memory_lines(config)

    def _memory_lines(self, config: TrainConfig) -> list[str]:
        if self.estimate is None:
            return []
        key = config_to_json(config)
        if self._estimate_wanted is None or self._estimate_wanted[0] != key:
            self._estimate_wanted, self._wanted_since = (key, config), time.monotonic()
        if key != self._estimated or self.estimate.running:
            return ["memory estimate: working it out…"]
        if self.estimate.error:
            return [f"no memory estimate: {self.estimate.error}"]
        return ["memory estimate:", *(f"  {line}" for line in self.estimate.lines)]

    def poll_estimate(self) -> bool:
        """Start the estimate of the config last shown once it held still, and say whether one
        ended during this call (the status then changes). The view calls this from its loop."""
        if self.estimate is None:
            return False
        ended = self.estimate.poll()
        wanted = self._estimate_wanted
        if (
            wanted is not None
            and wanted[0] != self._estimated
            and not self.estimate.running
            and time.monotonic() - self._wanted_since >= self.estimate_delay
        ):
            self._estimated = wanted[0]
            self.estimate.start(wanted[1])
        return ended

    def status_lines(self) -> list[str]:
        """The status area: how the run is doing or how it ended, its notices (the data report),
        then, while nothing runs, what Start would say."""
        progress, running = self.run.progress, self.run.running
        lines: list[str] = []
        if running:
            lines.append(
                f"{progress.state}: {progress.phase}" if progress.phase else progress.state
            )
            if progress.last_backup:
                lines.append(f"last backup: {progress.last_backup}")
        elif progress.state == "finished":
            lines.append(f"finished after {progress.step} steps; LoRA: {progress.output}")
        elif progress.state == "stopped":
            backup = progress.last_backup or "none (backup.on_interrupt is off)"
            lines.append(f"stopped at step {progress.step}; backup: {backup}")
            if progress.last_backup:
                lines.append("Resume continues from the newest backup.")
        elif progress.state == "failed":
            lines.append(f"error: {progress.error}")
        lines += progress.notices
        if not running:
            lines += [""] * bool(lines) + self.pre_start_lines()
        return lines

    def warm_up(self) -> None:
        """Prepare the worker processes' imports in the background (see run_control.warm_up)."""
        warm_up(self.run.context)

    def poll(self) -> list[object]:
        """Run events since the last call (the view calls this from its event loop)."""
        self.scan.poll()
        return self.run.poll()

    def shutdown(self, timeout: float = 60) -> None:
        """Stop a run (with its backup) and wait for it; used when the window closes."""
        for report in (self.scan, self.estimate):
            if report is not None:
                report.cancel()
        for wait in (timeout, 5):  # a stop at the next step, then at once
            if self.run.running:
                self.run.stop()
                self.run.wait(wait)
                self.run.poll()
