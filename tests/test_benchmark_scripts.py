"""Every benchmark script runs end to end in its smallest setting, as a user would start it.

The numbers are not checked here (speed belongs to the benchmarks, not to timed tests): what is
checked is that the scripts still work against the current code, print their table and, with
`--no-write`, leave docs/benchmarks.md alone. A renamed keyword once broke a benchmark that
nothing ran until its next measurement.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "docs" / "benchmarks.md"

# script -> (the smallest arguments that still go through every part, a line the table prints)
SMOKE_RUNS = {
    "benchmark_preconditioner.py": (
        ["--ranks", "4", "--repeats", "1", "--threads", "1", "--no-write"],
        "| rank | LoRA params | ours, Riemannian |",
    ),
    "benchmark_preconditioner_step.py": (
        [
            *["--steps", "3", "--warmup", "1", "--runs", "1", "--sketch-rounds", "1"],
            *["--threads", "1", "--no-write"],
        ],
        "| Riemannian |",
    ),
    "benchmark_adaprelora_statistics.py": (
        ["--steps", "3", "--seeds", "1", "--threads", "1", "--no-write"],
        "Training with the sketch ends at a loss",
    ),
    "benchmark_damping.py": (["--steps", "3", "--seeds", "1", "--no-write"], "| kappa 100, r 8 |"),
    "benchmark_training.py": (["--steps", "2", "--warmup", "1", "--no-write"], "| no | float32 |"),
    "benchmark_data.py": (
        ["--images", "8", "--steps", "3", "--warmup", "1", "--rounds", "1", "--no-write"],
        "| loader cost |",
    ),
}


def test_every_benchmark_script_has_a_smoke_run():
    assert sorted(SMOKE_RUNS) == sorted(p.name for p in (REPO / "scripts").glob("benchmark_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_script_runs(script):
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
