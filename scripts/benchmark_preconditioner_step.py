"""What LoRA gradient preconditioning adds to a whole training step of the tiny SDXL model.

Builds the tiny SDXL model and the demo data set in a temporary folder and constructs one real
`TrainingRun` per setting: preconditioning off, off again (a copy: it shows how far two identical
settings drift apart on this machine, i.e. the measurement's resolution), Riemannian,
AdaPreLoRA, and AdaPreLoRA with exact statistics (scripts/exact_statistics.py: what the sketch
saves). Each run trains in its own thread, but only one thread works at a time: they take
turns step by step, round robin, so every round times each setting once within a few hundred
milliseconds of the others. Load from other jobs on a shared machine then hits all settings
alike, which separate runs one after another (an earlier version of this benchmark) did not
achieve: their medians moved by +-10% from run to run.

Per setting: median seconds per step, and the median over rounds of each round's step time
divided by the same round's "off" step (the paired overhead). The preconditioned runs also time
the optimizer-step hook itself. The first `--warmup` steps and the last step of each run (which
overlaps the other threads' saving) are excluded.

Writes the table into docs/benchmarks.md (section `preconditioner_step`) unless `--no-write`.

    python scripts/benchmark_preconditioner_step.py [--steps 150] [--warmup 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from exact_statistics import use_exact_statistics  # noqa: E402
from torch import nn  # noqa: E402

from modules.config.loading import load_config  # noqa: E402
from modules.data.demo_dataset import write_demo_dataset  # noqa: E402
from modules.lora.layers import LoRALinear  # noqa: E402
from modules.lora.preconditioning.fused_sketch import FusedLinearSketch  # noqa: E402
from modules.lora.preconditioning.preconditioner import PreconditionerSettings  # noqa: E402
from modules.lora.preconditioning.sketch import LayerSketch, ProbeSource, install_tap  # noqa: E402
from modules.models.tiny_sdxl import build_tiny_sdxl  # noqa: E402
from modules.training.trainer import TrainingRun  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import replace_section  # noqa: E402

# setting name -> the lora section's preconditioning keys
SETTINGS: dict[str, dict] = {
    "off": {"riemannian_preconditioning": False},
    "off (a second copy)": {"riemannian_preconditioning": False},
    "Riemannian": {"riemannian_preconditioning": True, "preconditioner": "riemannian"},
    "AdaPreLoRA": {"riemannian_preconditioning": True, "preconditioner": "adaprelora"},
    "AdaPreLoRA, statistics every 4th step": {
        "riemannian_preconditioning": True,
        "preconditioner": "adaprelora",
        "adaprelora_statistics_every": 4,
    },
    "AdaPreLoRA, exact statistics": {
        "riemannian_preconditioning": True,
        "preconditioner": "adaprelora",
    },
}
# settings that change the run after it is built
ADJUST = {"AdaPreLoRA, exact statistics": lambda run: use_exact_statistics(run, alongside=())}
TARGET = 1.03  # at most 3% overhead on a whole step


def training_config(root: Path, *, name: str, lora: dict, steps: int) -> dict:
    """Like tests/helpers.tiny_config, at rank 16 on the attention and MLP layers."""
    return {
        "model": {"base_model": str(root / "model")},
        "lora": {"rank": 16, "alpha": 16, "layer_preset": "attn-mlp", **lora},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_steps": steps, "batch_size": 2, "seed": 7},
        "data": {"resolution": 64, "concepts": [{"path": str(root / "data")}]},
        "sampling": {"prompts": [], "at_end": False},
        "output": {"workspace_dir": str(root / name), "name": "bench-lora"},
    }


class RoundRobin:
    """A baton passed between threads in turn; a finished thread leaves the ring.

    After each full round the ring rotates by one, so no setting always goes first (or always
    follows the same one) and position effects average out over the rounds.
    """

    def __init__(self, names: list[str]) -> None:
        self.ring = list(names)
        self.turn = 0
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.ring[self.turn] == name)

    def pass_on(self, name: str, *, leave: bool = False) -> None:
        with self.condition:
            index = self.ring.index(name)
            if leave:
                self.ring.pop(index)
                self.turn = index % len(self.ring) if self.ring else 0
            elif index + 1 < len(self.ring):
                self.turn = index + 1
            else:
                self.ring = self.ring[1:] + self.ring[:1]
                self.turn = 0
            self.condition.notify_all()


@dataclass
class Timings:
    steps: list[float] = field(default_factory=list)  # seconds of each optimizer step, in order
    hook: list[float] = field(default_factory=list)  # seconds of the preconditioner hook


def instrument(
    run: TrainingRun, *, name: str, baton: RoundRobin, timings: Timings
) -> Callable[[], None]:
    """Time each step from taking the baton to the end of `pipeline.step`, then pass it on.

    Returns the function that starts the first step's clock."""
    original_step = run.pipeline.step
    started = [0.0]

    def step():
        outcome = original_step()
        timings.steps.append(time.perf_counter() - started[0])
        last = len(timings.steps) == run.total_steps
        baton.pass_on(name, leave=last)
        if not last:
            baton.wait(name)
            started[0] = time.perf_counter()
        return outcome

    run.pipeline.step = step
    if run.preconditioner is not None:
        original_precondition = run.preconditioner.precondition

        def precondition() -> None:
            start = time.perf_counter()
            original_precondition()
            timings.hook.append(time.perf_counter() - start)

        # the optimizer pre-hook calls self.precondition(): the instance attribute wins
        run.preconditioner.precondition = precondition

    def start() -> None:
        started[0] = time.perf_counter()

    return start


def measure(root: Path, *, steps: int) -> dict[str, Timings]:
    runs = {
        name: TrainingRun(
            load_config(raw=training_config(root, name=f"run-{index}", lora=lora, steps=steps))
        )
        for index, (name, lora) in enumerate(SETTINGS.items())
    }
    for name, adjust in ADJUST.items():
        adjust(runs[name])
    baton = RoundRobin(list(runs))
    timings = {name: Timings() for name in runs}
    errors: list[BaseException] = []

    def work(name: str, run: TrainingRun, start: Callable[[], None]) -> None:
        try:
            baton.wait(name)
            start()
            run.run()
        except BaseException as error:  # report it from the main thread
            errors.append(error)
            baton.pass_on(name, leave=True)

    threads = [
        threading.Thread(
            target=work,
            args=(name, run, instrument(run, name=name, baton=baton, timings=timings[name])),
        )
        for name, run in runs.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timings


@dataclass(frozen=True)
class Row:
    name: str
    step: float  # median seconds per step
    paired: float  # median over rounds of step / the round's "off" step
    hook: float | None  # median seconds of the hook


def summarise(timings: dict[str, Timings], *, warmup: int) -> list[Row]:
    kept = {name: t.steps[warmup:-1] for name, t in timings.items()}
    reference = kept["off"]
    rows = []
    for name, steps in kept.items():
        ratios = [step / base for step, base in zip(steps, reference, strict=True)]
        hook = statistics.median(timings[name].hook[warmup:-1]) if timings[name].hook else None
        rows.append(Row(name, statistics.median(steps), statistics.median(ratios), hook))
    return rows


def table(
    rows: list[Row], *, sketch: dict[str, float], header_line: str, steps: int, warmup: int
) -> str:
    off = rows[0].step
    lines = [
        "## LoRA gradient preconditioning: overhead on a whole training step "
        "(`scripts/benchmark_preconditioner_step.py`)",
        "",
        f"{header_line} Tiny SDXL model, LoRA rank 16 on `attn-mlp`, batch 2 at 64 px, fp32, the "
        f"real `TrainingRun`; the settings take turns step by step, {steps} steps each, the first "
        f"{warmup} and the last excluded ({steps - warmup - 1} rounds).",
        "",
        "| setting | median step | paired overhead (median of per-round ratios) | "
        "hook alone (share of the off step) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        hook = "" if row.hook is None else f"{row.hook * 1e3:.2f} ms ({100 * row.hook / off:.1f}%)"
        paired = "(reference)" if row is rows[0] else f"{100 * (row.paired - 1):+.1f}%"
        lines.append(f"| {row.name} | {row.step * 1e3:.1f} ms | {paired} | {hook} |")
    by_name = {row.name: row for row in rows}
    resolution = abs(by_name["off (a second copy)"].paired - 1)
    verdicts = [
        f"{name}: {100 * (by_name[name].paired - 1):+.1f}%, "
        + ("met" if by_name[name].paired <= TARGET else "NOT met")
        for name in ("Riemannian", "AdaPreLoRA", "AdaPreLoRA, statistics every 4th step")
    ]
    lines += [
        "",
        f"Target, at most {100 * (TARGET - 1):.0f}% overhead on a whole step: "
        + "; ".join(verdicts)
        + f". Two identical settings differ by {100 * resolution:.1f}% here, the resolution of "
        "this measurement.",
        "",
        "AdaPreLoRA's sketches (p = 8) ride in the LoRA's own products, widened from r to r + p "
        "columns; on the 64-wide tiny model what they add is mostly per-layer call overhead. At "
        "SDXL width, one 1280 x 1280 `to_q` layer with a rank-16 LoRA, batch 2 of 1024 tokens, "
        f"forward and backward: {sketch['plain'] * 1e3:.1f} ms plain, "
        f"{sketch['fused'] * 1e3:.1f} ms with the fused sketches "
        f"({100 * (sketch['fused'] / sketch['plain'] - 1):+.1f}%), "
        f"{sketch['tap'] * 1e3:.1f} ms with a separate tap instead "
        f"({100 * (sketch['tap'] / sketch['plain'] - 1):+.1f}%; it reads the input and output "
        "gradient twice more).",
    ]
    return "\n".join(lines)


def sketch_cost_at_sdxl_width(*, rounds: int) -> dict[str, float]:
    """AdaPreLoRA's statistics against one SDXL-sized layer's own forward and backward.

    The tiny model's layers are 64 wide, where any per-layer work is mostly call overhead; SDXL's
    attention layers are 1280 wide. One `to_q`-shaped Linear (1280 x 1280, batch 2 of 1024
    tokens: 1024 px images at that UNet level) with a rank-16 LoRA, forward and backward: plain,
    with the sketches fused into the LoRA's products (what training uses) and with the separate
    tap (the reference path, used for Conv2d), taking turns; median of `rounds`.
    """
    width, tokens, p = 1280, 1024, PreconditionerSettings().sketch_size
    base = nn.Linear(width, width, bias=False).requires_grad_(False)
    adapter = LoRALinear(base=base, name="to_q", rank=16, alpha=16, dropout=0.0)
    adapter.attach()
    inputs = torch.randn(2, tokens, width, requires_grad=True)
    sink = LayerSketch(
        rows=torch.zeros(width, p),
        cols=torch.zeros(p, width),
        base=base,
        probes=ProbeSource(size=p, seed=0),
    )

    def step() -> float:
        start = time.perf_counter()
        base(inputs).square().mean().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "fused": [], "tap": []}
    for _ in range(rounds + 2):
        times["plain"].append(step())
        adapter.delta_sketch = FusedLinearSketch(sink)
        times["fused"].append(step())
        adapter.delta_sketch = None
        handle = install_tap(sink)
        times["tap"].append(step())
        handle.remove()
    return {name: statistics.median(values[2:]) for name, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--sketch-rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header_line = benchmark_header("scripts/benchmark_preconditioner_step.py")  # load before
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_sdxl(root / "model")
        write_demo_dataset(root / "data", count=8, size=64)
        timings = measure(root, steps=args.steps)
    sketch = sketch_cost_at_sdxl_width(rounds=args.sketch_rounds)
    text = table(
        summarise(timings, warmup=args.warmup),
        sketch=sketch,
        header_line=header_line,
        steps=args.steps,
        warmup=args.warmup,
    )
    print(text)
    if not args.no_write:
        replace_section(REPO / "docs" / "benchmarks.md", "preconditioner_step", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
