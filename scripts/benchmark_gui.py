"""How fast the trainer window opens, and how responsive it stays while a run trains.

    python scripts/benchmark_gui.py [--opens 5] [--steps 40] [--no-write]

- Open: a fresh Python process opens the window as start-ui.py does; timed from starting the
  process (interpreter start and imports included) to the first tab drawn, and to every tab and
  the loss plot built (the rest is built in idle moments after the window shows).
- Event-loop lateness: a Tk `after` tick asks to run every 20 ms; how late each one runs is the
  delay a click or a keystroke would see. Measured idle, while the run prepares (model loading,
  caching) and while it trains (the demo preset on the tiny built-in model, in its worker
  process, polled by the window every 100 ms).

Runs under a private Xvfb when there is no desktop. Writes the tables into docs/benchmarks.md
(section `gui`) unless `--no-write`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modules.config.loading import load_config  # noqa: E402
from modules.data.demo_dataset import write_demo_dataset  # noqa: E402
from modules.models.sdxl.tiny import build_tiny_sdxl  # noqa: E402
from modules.ui.ctk.display import virtual_display  # noqa: E402
from modules.ui.trainer_app import TrainerApp  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

TICK_MS = 20
OPEN_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from modules.ui.ctk.launch import open_window
window = open_window()
print("shown", time.process_time(), flush=True)
while window.panel.plot is None or len(window.tabs) < len(window.titles):
    window.update()
    time.sleep(0.005)
print("built", time.process_time(), flush=True)
window.destroy()
"""


def time_opens(count: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds from starting a process to the window shown, and to every tab built.
    The CPU time is the process's own, so it holds on a machine busy with other work."""
    times: dict[str, list[tuple[float, float]]] = {"shown": [], "built": []}
    for _ in range(count):
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-c", OPEN_CHILD.format(root=str(ROOT))],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert child.stdout is not None
        for stage, found in times.items():
            words = child.stdout.readline().split()
            if not words or words[0] != stage:
                raise SystemExit(f"the window did not open: exit code {child.wait()}")
            found.append((time.perf_counter() - start, float(words[1])))
        child.wait()
    return times


class Lateness:
    """Ticks of the Tk event loop, each filed under the run's state when it ran."""

    def __init__(self, window: Any, app: TrainerApp) -> None:
        self.window, self.app = window, app
        self.by_phase: dict[str, list[float]] = {}
        self._due = time.perf_counter() + TICK_MS / 1000
        window.after(TICK_MS, self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        phase = self.app.run.progress.state if self.app.run.running else "idle"
        self.by_phase.setdefault(phase, []).append(now - self._due)
        self._due = now + TICK_MS / 1000
        self.window.after(TICK_MS, self._tick)


def measure_run(steps: int, root: Path) -> dict[str, list[float]]:
    build_tiny_sdxl(root / "tiny-sdxl")
    write_demo_dataset(root / "dataset", count=8, size=64)
    config = load_config(
        ROOT / "training_presets" / "demo.json",
        overrides=[
            f"model.base_model={root / 'tiny-sdxl'}",
            f'data.concepts=[{{"path": "{root / "dataset"}"}}]',
            "data.validation.concepts=[]",
            f"output.workspace_dir={root / 'run'}",
            f"training.max_steps={steps}",
            "lora.preconditioner=riemannian",
            "sampling.every_n_steps=0",
            "sampling.at_end=false",
            "backup.every_n_steps=0",
            "data.workers=0",
        ],
    )
    from modules.ui.ctk.launch import open_window

    app = TrainerApp(config=config)
    window = open_window(app=app)
    window.build_all()
    lateness = Lateness(window, app)
    started = time.perf_counter()

    def watch() -> None:
        idle_for = time.perf_counter() - started
        if not app.run.running and app.run.progress.state == "idle" and idle_for > 3:
            window.start()
        elif app.run.progress.state in ("finished", "failed", "stopped"):
            window.quit()
            return
        window.after(200, watch)

    window.after(200, watch)
    window.mainloop()
    if app.run.progress.state != "finished":
        raise SystemExit(f"the run did not finish: {app.run.progress.error}")
    window.destroy()
    return lateness.by_phase


def ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opens", type=int, default=5, help="fresh processes opening the window")
    parser.add_argument("--steps", type=int, default=40, help="steps of the measured run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header = benchmark_header("scripts/benchmark_gui.py")
    with virtual_display(), tempfile.TemporaryDirectory() as tmp:
        opens = time_opens(args.opens)
        phases = measure_run(args.steps, Path(tmp))
    lines = [
        "## Trainer window (`scripts/benchmark_gui.py`)",
        "",
        header,
        "",
        "| from starting the process | wall, median | wall, worst | CPU, median |",
        "| --- | --- | --- | --- |",
        *(
            f"| {title} | {statistics.median(w for w, _ in opens[stage]):.2f} s "
            f"| {max(w for w, _ in opens[stage]):.2f} s "
            f"| {statistics.median(c for _, c in opens[stage]):.2f} s |"
            for stage, title in (
                ("shown", f"window open, first tab drawn ({args.opens} opens)"),
                ("built", "every tab and the loss plot built (in idle moments after opening)"),
            )
        ),
        "",
        f"Event-loop lateness of a {TICK_MS} ms Tk timer (what a click or keystroke waits), "
        f"while a {args.steps}-step tiny run trains in its worker process:",
        "",
        "| window state | ticks | median | 95th percentile | max |",
        "| --- | --- | --- | --- | --- |",
    ]
    for phase in ("idle", "preparing", "training"):
        values = phases.get(phase, [])
        if values:
            lines.append(
                f"| {phase} | {len(values)} | {ms(values, 0.5)} | {ms(values, 0.95)} "
                f"| {ms(values, 1.0)} |"
            )
    report_benchmark("\n".join(lines), section="gui", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
