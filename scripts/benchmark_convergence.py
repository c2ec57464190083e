"""Does lora.preconditioner make LoRA training converge faster and over a wider learning-rate band?

Two experiments, eight arms, each arm a config that trains through the project's optimizer
factory, preconditioner hook and gradient pipeline (scripts/convergence_problems.py):

- E1: a LoRA on a frozen linear layer learns a rank-4 target with condition number 1, 10 and 100,
  at LoRA ranks 4 and 16; steps to a relative error of 1e-2 over a learning-rate grid.
- E2: the tiny world's concept fine-tune (the `make demo` task on resources/tiny-world-sdxl), at
  LoRA ranks 4 and 32; final and best validation loss, steps to a target validation loss and the
  divergence count over a 7-point learning-rate grid spanning 3 decades, 3 seeds.

Arms: AdamW, AdamW + Riemannian, AdamW + AdaPreLoRA, SGD (momentum 0.9, the config default),
SGD + Riemannian, Prodigy, Prodigy + Riemannian, LoRA+ (AdamW, ratio 16). All arms of a seed start
from the same LoRA weights and see the same batches and noise. Writes tables into
docs/benchmarks.md, plots into docs/images/ and the raw curves into --raw.

    python scripts/benchmark_convergence.py [--quick] [--workers 2] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts import convergence_report as report  # noqa: E402
from scripts.convergence_report import E1_TARGETS  # noqa: E402

MODEL = REPO / "resources" / "tiny-world-sdxl"
# E1 is an optimisation problem with an exact solution: nothing pulls the weights elsewhere
E1_SETTINGS = {"optimizer": {"weight_decay": 0.0}, "training": {"max_grad_norm": 0.0}}


def lr_grid(low: float, points: int = 7, decades: float = 3.0) -> list[float]:
    return [float(f"{low * 10 ** (decades * i / (points - 1)):.3g}") for i in range(points)]


@dataclass(frozen=True)
class Arm:
    name: str
    family: str  # learning-rate grid family: adamw, sgd, prodigy
    settings: dict[str, Any] = field(default_factory=dict)


ARMS = [
    Arm("AdamW", "adamw", {"optimizer": {"name": "adamw"}}),
    Arm(
        "AdamW + Riemannian",
        "adamw",
        {"optimizer": {"name": "adamw"}, "lora": {"preconditioner": "riemannian"}},
    ),
    Arm(
        "AdamW + AdaPreLoRA",
        "adamw",
        {"optimizer": {"name": "adamw"}, "lora": {"preconditioner": "adaprelora"}},
    ),
    Arm("SGD", "sgd", {"optimizer": {"name": "sgd"}}),
    Arm(
        "SGD + Riemannian",
        "sgd",
        {"optimizer": {"name": "sgd"}, "lora": {"preconditioner": "riemannian"}},
    ),
    Arm("Prodigy", "prodigy", {"optimizer": {"name": "prodigy"}}),
    Arm(
        "Prodigy + Riemannian",
        "prodigy",
        {"optimizer": {"name": "prodigy"}, "lora": {"preconditioner": "riemannian"}},
    ),
    Arm(
        "LoRA+ (ratio 16)",
        "adamw",
        {"optimizer": {"name": "adamw"}, "lora": {"loraplus_ratio": 16}},
    ),
]


@dataclass(frozen=True)
class Plan:
    """What one experiment runs: its problems, the grids per arm family, seeds and steps."""

    name: str
    problems: list[dict[str, Any]]  # E1: condition and rank; E2: rank
    grids: dict[str, list[float]]
    seeds: int
    steps: int
    every: int = 1  # E2: validation every n steps


def plans(quick: bool) -> list[Plan]:
    if quick:
        return [
            Plan(
                "E1",
                [{"condition": 100.0, "rank": 4}],
                {"adamw": [1e-2], "sgd": [0.1], "prodigy": [1.0]},
                seeds=1,
                steps=20,
            ),
            Plan(
                "E2",
                [{"rank": 4}],
                {"adamw": [1e-3], "sgd": [1.0], "prodigy": [1.0]},
                seeds=1,
                steps=2,
                every=1,
            ),
        ]
    return [
        Plan(
            "E1",
            [{"condition": c, "rank": r} for c in (1.0, 10.0, 100.0) for r in (4, 16)],
            {"adamw": lr_grid(1e-3), "sgd": lr_grid(1e-3), "prodigy": lr_grid(1e-2)},
            seeds=3,
            steps=400,
        ),
        Plan(
            "E2",
            [{"rank": 4}, {"rank": 32}],
            {"adamw": lr_grid(1e-4), "sgd": lr_grid(1e-2), "prodigy": lr_grid(1e-2)},
            seeds=3,
            steps=40,
            every=10,
        ),
    ]


# -- running ----------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _start_worker(threads: int) -> None:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from modules.util.library_notices import quiet_library_notices

    quiet_library_notices()
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=False)
    _WORKER["accelerator"] = Accelerator(mixed_precision="no", cpu=True)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (experiment, problem, arm, lr, seed) run; returns its curve."""
    with contextlib.redirect_stdout(io.StringIO()):  # Prodigy's and the hook's notices
        return _run_quietly(job)


def _run_quietly(job: dict[str, Any]) -> dict[str, Any]:
    from scripts.convergence_problems import ConceptProblem, LinearProblem, arm_config

    if "accelerator" not in _WORKER:
        _start_worker(1)
    accelerator = _WORKER["accelerator"]
    settings, problem = job["settings"], job["problem"]
    started, cpu = time.perf_counter(), time.process_time()
    if job["experiment"] == "E1":
        config = arm_config(settings, E1_SETTINGS, lr=job["lr"], rank=problem["rank"])
        linear = LinearProblem(
            condition=problem["condition"],
            rank=problem["rank"],
            seed=job["seed"],
            accelerator=accelerator,
        )
        curve = linear.run(config, steps=job["steps"], target=min(E1_TARGETS))
    else:
        key = f"E2-{problem['rank']}"
        if key not in _WORKER:
            _WORKER[key] = ConceptProblem(
                model=Path(job["model"]), rank=problem["rank"], accelerator=accelerator
            )
        concept = _WORKER[key]
        config = arm_config(settings, lr=job["lr"], rank=problem["rank"])
        curve = concept.run(config, seed=job["seed"], steps=job["steps"], every=job["every"])
    return {
        **job,
        "steps_at": curve.steps,
        "values": [v if math.isfinite(v) else None for v in curve.values],
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }


def jobs_of(plan: Plan, model: Path, arms: list[Arm] = ARMS) -> list[dict[str, Any]]:
    return [
        {
            "experiment": plan.name,
            "problem": problem,
            "arm": arm.name,
            "settings": arm.settings,
            "lr": lr,
            "seed": seed,
            "steps": plan.steps,
            "every": plan.every,
            "model": str(model),
        }
        for problem in plan.problems
        for seed in range(plan.seeds)  # a run cut short still has whole seeds of every arm
        for arm in arms
        for lr in plan.grids[arm.family]
    ]


def run_jobs(
    jobs: list[dict[str, Any]], *, workers: int, progress=lambda results: None
) -> list[dict[str, Any]]:
    """Every job's curve, in job order; `progress(results so far)` every 25 runs."""
    results, started = [], time.perf_counter()
    if workers <= 1:
        _start_worker(1)
        stream = map(_run_job, jobs)
    else:
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(1,),
        )
        # E2 jobs grouped by rank, so each worker loads each rank's problem once
        stream = pool.map(_run_job, jobs, chunksize=1)
    for index, result in enumerate(stream, start=1):
        results.append(result)
        if index % 25 == 0 or index == len(jobs):
            elapsed = time.perf_counter() - started
            print(f"{index}/{len(jobs)} runs, {elapsed / 60:.1f} min", flush=True)
            progress(results)
    if workers > 1:
        pool.shutdown()
    return results


def _read_raw(path: Path) -> dict[str, dict[str, Any]]:
    """experiment name -> its last recorded run (header, minutes, plan, results)."""
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))["experiments"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one setting per arm, a few steps")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument(
        "--only", choices=["E1", "E2"], help="run one experiment; the report keeps the other's"
    )
    parser.add_argument(
        "--raw",
        help="raw curves of every experiment's last run (JSON); default "
        "workspace/benchmarks/convergence[-quick].json",
    )
    parser.add_argument("--report-only", action="store_true", help="tables from --raw, no runs")
    parser.add_argument("--images", default=str(REPO / "docs" / "images"))
    parser.add_argument("--doc", default=str(report.BENCHMARKS_MD), help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print, leave the docs alone")
    args = parser.parse_args()
    import torch

    from modules.util.machine import benchmark_header

    default_raw = f"convergence{'-quick' if args.quick else ''}.json"
    raw = Path(args.raw or REPO / "workspace" / "benchmarks" / default_raw)
    records = _read_raw(raw)
    if not args.report_only:
        torch.set_num_threads(1)  # as in each worker
        header = benchmark_header("scripts/benchmark_convergence.py")  # the load before the runs
        header += f" {args.workers} worker process(es)."
        for plan in plans(args.quick):
            if args.only not in (None, plan.name):
                continue
            started, jobs = time.perf_counter(), jobs_of(plan, Path(args.model))

            def record(
                results: list[dict[str, Any]], plan=plan, jobs=jobs, started=started
            ) -> None:
                """Kept after every few runs: a run stopped early still reports whole seeds."""
                records[plan.name] = {
                    "header": header,
                    "minutes": (time.perf_counter() - started) / 60,
                    "plan": dataclasses.asdict(plan),
                    "jobs": len(jobs),
                    "results": results,
                }
                raw.parent.mkdir(parents=True, exist_ok=True)
                raw.write_text(json.dumps({"experiments": records}), encoding="utf-8")

            record(run_jobs(jobs, workers=args.workers, progress=record))
    if not records:
        parser.error(f"no recorded runs in {raw}")
    text = report.write_report(
        records,
        images=Path(args.images),
        doc=Path(args.doc),
        write=not args.no_write,
        quick=args.quick,
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
