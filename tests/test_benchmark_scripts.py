"""Every benchmark script runs end to end in its smallest setting, as a user would start it.

The numbers are not checked here (speed belongs to the benchmarks, not to timed tests): what is
checked is that the scripts still work against the current code, print their table and, with
`--no-write`, leave docs/benchmarks.md alone. A renamed keyword once broke a benchmark that
nothing ran until its next measurement.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"

# script -> (the smallest arguments that still go through every part, a line the table prints)
SMOKE_RUNS = {
    "benchmark_preconditioner.py": (
        ["--ranks", "4", "--repeats", "1", "--tap-rounds", "1", "--threads", "1", "--no-write"],
        "| rank | LoRA params | ours, Riemannian |",
    ),
    "benchmark_preconditioner_step.py": (
        [
            "--steps=5",
            "--turn=2",
            "--warmup=1",
            "--threads=1",
            "--settings=AdaPreLoRA",
            "--no-write",
        ],
        "| AdaPreLoRA |",
    ),
    "benchmark_convergence.py": (
        ["--quick", "--workers", "1", "--no-write"],
        "| LoRA+ (ratio 16) |",
    ),
    "benchmark_damping.py": (
        ["--quick", "--workers", "1", "--no-write"],
        "| SGD + Riemannian, damping 0.001 |",
    ),
    "convergence_ablation.py": (
        ["--quick", "--rank", "4", "--workers", "1", "--no-write"],
        "| AdamW + Riemannian |",
    ),
    "benchmark_training.py": (["--steps", "2", "--warmup", "1", "--no-write"], "| no | float32 |"),
    "benchmark_flux_memory.py": (
        ["--resolution", "256", "--no-write"],
        "| Flux.1-dev, nf4, 38 blocks offloaded |",
    ),
    "benchmark_data.py": (
        ["--images", "8", "--steps", "3", "--warmup", "1", "--rounds", "1", "--no-write"],
        "| loader cost |",
    ),
    "benchmark_gui.py": (["--opens", "1", "--steps", "2", "--no-write"], "| window open, first"),
}
# scripts that open a window: they need a display or Xvfb
NEEDS_DISPLAY = {"benchmark_gui.py"}


def test_every_benchmark_script_has_a_smoke_run():
    """Every script that writes a section of docs/benchmarks.md."""
    scripts = [*(REPO / "scripts").glob("benchmark_*.py"), REPO / "scripts/convergence_ablation.py"]
    assert sorted(SMOKE_RUNS) == sorted(p.name for p in scripts)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_script_runs(script):
    if script in NEEDS_DISPLAY and not (os.environ.get("DISPLAY") or shutil.which("Xvfb")):
        pytest.skip("no display and no Xvfb")
    arguments, expected = SMOKE_RUNS[script]
    recorded = BENCHMARKS.read_bytes()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
    assert BENCHMARKS.read_bytes() == recorded, f"{script} wrote docs/benchmarks.md"


def _script_module(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_overhead_counts_warm_steps_and_pairs_them_by_round():
    """The step benchmark leaves out the first step of every turn (a process that idled while the
    others worked pays for that there) and divides each round's time by the same round's "off"
    time, so load that changes between rounds cancels."""
    benchmark = _script_module("benchmark_preconditioner_step.py")

    def timings(warm_by_round: list[float]) -> object:
        result = benchmark.Timings()
        for round_index, warm in enumerate(warm_by_round):  # turns of 3: cold, warm, warm
            for position, seconds in enumerate([0.5, warm, warm]):
                result.steps.append(seconds)
                result.hook.append(None)
                result.rounds.append(round_index)
                result.timed.append(position > 0)
        result.steps.append(0.9)  # the last step (overlaps the others' saving)
        result.hook.append(None)
        result.rounds.append(len(warm_by_round))
        result.timed.append(False)
        return result

    # the machine's load doubles between the two rounds; the setting is 10% slower in both
    run = {"off": timings([0.050, 0.100]), "slower": timings([0.055, 0.110])}
    off, slower = benchmark.summarise(run, warmup=0)
    assert off.step == pytest.approx(0.075)  # median of the warm steps only
    assert slower.paired == pytest.approx(1.10)
    assert slower.spread == (pytest.approx(1.10), pytest.approx(1.10))
    assert slower.hook is None


@pytest.mark.slow
def test_flux_memory_benchmark_traces_once_and_estimates_as_the_trainer_does():
    """The memory benchmark traces the activations once per model and swaps in each setting's
    weights; every row must still be the estimate a run of that setting prints."""
    from modules.models.registry import get_family
    from modules.training.memory import estimate_memory

    benchmark = _script_module("benchmark_flux_memory.py")
    rows = [row for row in benchmark.settings(38) if row.family == "flux"]
    rows = [rows[0], rows[3], rows[4]]  # bf16, nf4, nf4 with offloading
    shortcut = benchmark.estimates(rows, resolution=256, batch=1)
    for row in rows:
        config = benchmark.config_for(row, resolution=256, batch=1)
        profile = get_family("flux").memory_profile(benchmark.meta_base("flux"), config)
        assert shortcut[row.name] == estimate_memory(profile, config), row.name
