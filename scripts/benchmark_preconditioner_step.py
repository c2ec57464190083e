"""What LoRA gradient preconditioning adds to a whole training step of the tiny SDXL model.

One real `TrainingRun` per setting (off, off again: the measurement's resolution, Riemannian,
AdaPreLoRA), each in its own process, one at a time: they take turns of `--turn` steps, so load
from other jobs hits every setting alike. Not counted: each turn's first step (a process that
idled pays for cold threads and caches there), the first `--warmup` steps and the last. Per
setting: the median step, the paired overhead (median over rounds of the step over the same
round's "off" step) with its spread over rounds, and the optimizer-step hook's median time.
AdaPreLoRA's sketches also cost backward time: four products with p = 8 probe columns per layer,
about 4p / 3n of a frozen n-wide layer's own products, so far more on the tiny model's 64-wide
layers than at SDXL width (`scripts/benchmark_preconditioner.py` times the tap on a 1280-wide
layer).

    python scripts/benchmark_preconditioner_step.py [--steps 150] [--turn 10] [--warmup 5]
        [--threads 2] [--settings NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modules.config.loading import load_config  # noqa: E402
from modules.data.demo_dataset import write_demo_dataset  # noqa: E402
from modules.models.sdxl.tiny import build_tiny_sdxl  # noqa: E402
from modules.training.trainer import TrainingRun  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

OFF, ADAPRELORA = {"preconditioner": "none"}, {"preconditioner": "adaprelora"}
# setting -> its `lora` options
SETTINGS = {"off": OFF, "off (a second copy)": OFF, "Riemannian": {"preconditioner": "riemannian"}}
SETTINGS |= {
    "AdaPreLoRA": ADAPRELORA,
    "AdaPreLoRA, statistics every 4th step": ADAPRELORA | {"adaprelora_statistics_every": 4},
}
TARGET = 1.03  # at most 3% overhead on a whole step


@dataclass
class Timings:
    steps: list[float] = field(default_factory=list)  # seconds of each optimizer step, in order
    hook: list[float | None] = field(default_factory=list)  # seconds of its preconditioner hook
    rounds: list[int] = field(default_factory=list)  # the round each step was taken in
    timed: list[bool] = field(default_factory=list)  # False: the first step of its turn

    def add(self, seconds: float, hook: float | None, *, round_index: int, timed: bool) -> None:
        self.steps.append(seconds)
        self.hook.append(hook)
        self.rounds.append(round_index)
        self.timed.append(timed)


def worker(root: Path, name: str, steps: int, threads: int, conn: Connection) -> None:
    """One setting's run: one optimizer step per "go", answered with its time and its hook's."""
    torch.set_num_threads(threads)
    lora = {"rank": 16, "alpha": 16, "layer_preset": "attn-mlp", **SETTINGS[name]}
    raw = {
        "model": {"base_model": str(root / "model")},
        "lora": lora,
        "training": {"max_steps": steps, "batch_size": 2, "seed": 7},
        "data": {"resolution": 64, "concepts": [{"path": str(root / "data")}]},
        "sampling": {"prompts": [], "at_end": False},
        "output": {"workspace_dir": str(root / name.replace(" ", "_")), "name": "bench"},
    }
    run = TrainingRun(load_config(raw=raw))
    hook: list[float] = []
    if run.preconditioner is not None:
        precondition = run.preconditioner.precondition

        def timed_precondition() -> None:
            start = time.perf_counter()
            precondition()
            hook.append(time.perf_counter() - start)

        run.preconditioner.precondition = timed_precondition  # what the pre-hook calls
    step, started, done = run.pipeline.step, [0.0], [0]

    def answering_step():
        outcome = step()
        done[0] += 1
        conn.send((time.perf_counter() - started[0], hook[-1] if hook else None))
        if done[0] < run.total_steps:
            conn.recv()  # the next "go"
            started[0] = time.perf_counter()
        return outcome

    run.pipeline.step = answering_step
    conn.send("ready")
    conn.recv()
    started[0] = time.perf_counter()
    run.run()
    conn.close()


def measure(
    root: Path, names: list[str], *, steps: int, turn: int, threads: int
) -> dict[str, Timings]:
    """Every setting in its own process, taking turns; the order rotates by one each round."""
    context = multiprocessing.get_context("spawn")
    connections, processes = {}, []
    try:
        for name in names:
            ours, theirs = context.Pipe()
            # not a daemon: its data loader starts worker processes of its own
            process = context.Process(target=worker, args=(root, name, steps, threads, theirs))
            process.start()
            connections[name] = ours
            processes.append(process)
        if any(connections[name].recv() != "ready" for name in names):
            raise RuntimeError("a benchmark worker did not start")
        timings = {name: Timings() for name in names}
        for round_index, first in enumerate(range(0, steps, turn)):
            count, shift = min(turn, steps - first), round_index % len(names)
            for name in names[shift:] + names[:shift]:
                for _ in range(count):
                    connections[name].send("go")
                for position in range(count):
                    seconds, hook = connections[name].recv()
                    timed = position > 0 or turn == 1
                    timings[name].add(seconds, hook, round_index=round_index, timed=timed)
        for process in processes:
            process.join(timeout=120)
            if process.exitcode != 0:
                raise RuntimeError(f"a benchmark worker failed (exit code {process.exitcode})")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
    return timings


@dataclass(frozen=True)
class Row:
    name: str
    step: float  # median seconds per step
    paired: float  # median over rounds of step / the round's "off" step
    spread: tuple[float, float]  # first and third quartile of those ratios
    hook: float | None  # median seconds of the hook


def _counted(timings: Timings, *, warmup: int) -> list[int]:
    """Steps past the warm-up, not the last, not a turn's first."""
    return [i for i in range(warmup, len(timings.steps) - 1) if timings.timed[i]]


def _round_medians(timings: Timings, *, warmup: int) -> dict[int, float]:
    by_round: dict[int, list[float]] = {}
    for i in _counted(timings, warmup=warmup):
        by_round.setdefault(timings.rounds[i], []).append(timings.steps[i])
    return {index: statistics.median(times) for index, times in by_round.items()}


def summarise(timings: dict[str, Timings], *, warmup: int) -> list[Row]:
    off = _round_medians(timings["off"], warmup=warmup)
    rows = []
    for name, mine in timings.items():
        rounds = _round_medians(mine, warmup=warmup)
        ratios = [rounds[i] / off[i] for i in sorted(rounds) if i in off]
        kept = _counted(mine, warmup=warmup)
        hooks = [mine.hook[i] for i in kept if mine.hook[i] is not None]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        step, paired = statistics.median(mine.steps[i] for i in kept), statistics.median(ratios)
        hook = statistics.median(hooks) if hooks else None
        rows.append(Row(name, step, paired, (quartiles[0], quartiles[2]), hook))
    return rows


def percent(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def table(rows: list[Row], args: argparse.Namespace) -> str:
    off, by_name = rows[0].step, {row.name: row for row in rows}
    lines = [
        f"Tiny SDXL model, LoRA rank 16 on `attn-mlp`, batch 2 at 64 px, fp32, the real "
        f"`TrainingRun` per setting in its own process; turns of {args.turn} steps, {args.steps} "
        f"steps each, not counting each turn's first step, the first {args.warmup} and the last.",
        "",
        "| setting | median step | paired overhead | rounds' quartiles | hook alone (share) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        hook = "" if row.hook is None else f"{row.hook * 1e3:.2f} ms ({100 * row.hook / off:.1f}%)"
        first = row is rows[0]
        paired = "(reference)" if first else percent(row.paired)
        spread = "" if first else " to ".join(map(percent, row.spread))
        lines.append(f"| {row.name} | {row.step * 1e3:.1f} ms | {paired} | {spread} | {hook} |")
    verdicts = [
        f"{name} {percent(row.paired)}, " + ("met" if row.paired <= TARGET else "NOT met")
        for name, row in by_name.items()
        if name.startswith(("Riemannian", "AdaPreLoRA"))
    ]
    text = f"Target, at most {percent(TARGET)} on a whole step: {'; '.join(verdicts)}."
    if "off (a second copy)" in by_name:
        resolution = percent(by_name["off (a second copy)"].paired)
        text += f" The two copies of off differ by {resolution}: the resolution of a verdict."
    lines += ["", text]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per setting")
    parser.add_argument("--turn", type=int, default=10, help="consecutive steps per turn")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS)[1:],
        default=list(SETTINGS)[1:],
        help="what to measure besides off (default: all)",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = benchmark_header("scripts/benchmark_preconditioner_step.py")  # load before the run
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_sdxl(root / "model")
        write_demo_dataset(root / "data", count=8, size=64)
        names = ["off", *args.settings]
        timings = measure(root, names, steps=args.steps, turn=args.turn, threads=args.threads)
    rows = summarise(timings, warmup=args.warmup)
    title = "## LoRA gradient preconditioning: overhead on a whole training step"
    text = "\n\n".join(
        [f"{title} (`scripts/benchmark_preconditioner_step.py`)", header, table(rows, args)]
    )
    report_benchmark(text, section="preconditioner_step", write=not args.no_write)


if __name__ == "__main__":
    main()
