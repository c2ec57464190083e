"""The convergence benchmark: its quick run, and the definitions its tables rest on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import convergence_report as report
from scripts.benchmark_convergence import ARMS
from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[1]


def _benchmark(tmp_path: Path, *args: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark_convergence.py"),
            *["--quick", "--workers", "1", "--doc", str(tmp_path / "benchmarks.md")],
            *["--raw", str(tmp_path / "raw.json"), "--images", str(tmp_path / "images"), *args],
        ],
        capture_output=True,
        text=True,
        env=cli_env(OMP_NUM_THREADS="1"),
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_quick_run_writes_its_tables_and_plots(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nbefore\n", encoding="utf-8")
    raw = tmp_path / "raw.json"
    _benchmark(tmp_path)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nbefore\n")
    section = text.split("<!-- convergence:start -->")[1].split("<!-- convergence:end -->")[0]
    for arm in ARMS:
        assert section.count(f"| {arm.name} |") == 5, arm.name  # E1 (2 tables x 2 targets), E2
    assert "### E1" in section and "### E2" in section
    images = ("convergence_e1_0.01.png", "convergence_e1_0.001.png", "convergence_e2_lr.png")
    for image in (*images, "convergence_e2_steps.png"):
        assert (tmp_path / "images" / image).stat().st_size > 0
    recorded = json.loads(raw.read_text(encoding="utf-8"))["experiments"]
    runs = recorded["E1"]["results"] + recorded["E2"]["results"]
    assert len(runs) == 2 * len(ARMS)
    # every arm of a seed starts from the same LoRA (B = 0: the same loss or error)
    for experiment in ("E1", "E2"):
        starts = {run["values"][0] for run in runs if run["experiment"] == experiment}
        assert len(starts) == 1, experiment
    # and the arms train differently: the preconditioner and LoRA+ change the result
    e1 = {run["arm"]: run["values"] for run in runs if run["experiment"] == "E1"}
    assert e1["AdamW"] != e1["AdamW + Riemannian"] != e1["AdamW + AdaPreLoRA"]
    assert e1["AdamW"] != e1["LoRA+ (ratio 16)"]
    assert e1["SGD"] != e1["SGD + Riemannian"]
    # rerunning one experiment keeps the other's last run in the report
    _benchmark(tmp_path, "--only", "E1")
    recorded_again = json.loads(raw.read_text(encoding="utf-8"))["experiments"]
    assert recorded_again["E2"] == recorded["E2"]
    assert "### E2" in doc.read_text(encoding="utf-8")


def _run(arm: str, lr: float, seed: int, values: list[float | None], rank: int = 4) -> dict:
    return {
        "experiment": "E2",
        "problem": {"rank": rank},
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "steps_at": [0, 10, 20, 30][: len(values)],
        "values": values,
    }


def test_e2_summary_band_target_and_divergence():
    """Base loss 1.0. The best learning rate (0.01) ends at 0.5; 0.001 keeps 90% of that
    improvement (0.54 <= 0.55), 0.1 does not (0.6) and 1.0 blew up."""
    runs = []
    for seed in range(3):
        runs += [
            _run("AdamW", 0.001, seed, [1.0, 0.8, 0.6, 0.54]),
            _run("AdamW", 0.01, seed, [1.0, 0.7, 0.5, 0.5]),
            _run("AdamW", 0.1, seed, [1.0, 0.6, 0.6, 0.6]),
            _run("AdamW", 1.0, seed, [1.0, None]),
        ]
    grouped = report.group_runs(runs, "E2", ARMS)
    arms = grouped["rank 4"]
    base, lowest, target = report.e2_levels(arms)
    assert (base, lowest) == (1.0, 0.5)
    assert target == pytest.approx(0.6)
    summary = report.e2_summary(arms["AdamW"], base=base, target=target)
    assert summary["best_lr"] == 0.01
    assert summary["band"] == pytest.approx(1.0)  # 0.001 to 0.01
    assert summary["steps"] == 20  # first measured at or below 0.6
    assert summary["diverged"] == 3


def test_e1_band_counts_adjacent_rates_that_reach_the_target():
    lrs = [0.001, 0.01, 0.1, 1.0]
    ok = {0.001: True, 0.01: False, 0.1: True, 1.0: True}
    assert report._band(lrs, ok, 0.1) == [0.1, 1.0]
    assert report._band(lrs, {lr: False for lr in lrs}, 0.1) == []
    assert report._decades([0.1, 1.0]) == pytest.approx(1.0)
    run = {"steps_at": [0, 1, 2, 3], "values": [1.0, 0.5, 0.009, 0.001]}
    assert report._steps_to(run, 1e-2) == 2
    assert math.isinf(report._steps_to({"steps_at": [0, 1], "values": [1.0, None]}, 0.5))
