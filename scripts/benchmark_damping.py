"""Which `lora.precondition_damping` suits which optimizer? Riemannian at three dampings, with
AdamW and with SGD, on both convergence problems.

The preconditioner's damping is relative to each r x r Gram's mean eigenvalue: large damping
turns it into a per-layer constant (plain optimizer), small damping follows the geometry strictly.
Adam already equalises step sizes per coordinate and SGD does not, so the best damping may differ
between the two: this measures it, 3 seeds each, on

- E1 (the linear-layer problem of `benchmark_convergence.py`) at condition numbers 10 and 100,
  LoRA ranks 4 and 16: steps to a relative error of 1e-3 and the band of learning rates that
  reach it;
- E2 (the concept fine-tune) at rank 32, run 200 steps instead of E2's 40, so that the arms have
  time to separate: final validation loss at each arm's best learning rate and its band.

Runs through the same harness, arms and reports as `benchmark_convergence.py`; the defaults and
advice (`modules/config/advice.py`) quote this section.

    python scripts/benchmark_damping.py [--quick] [--workers 2] [--report-only] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts import convergence_report as report  # noqa: E402
from scripts.benchmark_convergence import MODEL, Arm, Plan, jobs_of, lr_grid, run_jobs  # noqa: E402

DAMPINGS = (0.1, 0.01, 0.001)
E1_TARGET = 1e-3


def arms(optimizers: tuple[str, ...] = ("adamw", "sgd")) -> list[Arm]:
    """Per optimizer: plain, then Riemannian at each damping."""
    titles = {"adamw": "AdamW", "sgd": "SGD"}
    found = []
    for name in optimizers:
        found.append(Arm(name=titles[name], family=name, settings={"optimizer": {"name": name}}))
        found += [
            Arm(
                name=f"{titles[name]} + Riemannian, damping {damping:g}",
                family=name,
                settings={
                    "optimizer": {"name": name},
                    "lora": {"preconditioner": "riemannian", "precondition_damping": damping},
                },
            )
            for damping in DAMPINGS
        ]
    return found


def plans(quick: bool) -> list[Plan]:
    if quick:
        return [
            Plan(
                "E1",
                [{"condition": 100.0, "rank": 4}],
                {"adamw": [1e-2], "sgd": [0.1]},
                seeds=1,
                steps=5,
            ),
            Plan("E2", [{"rank": 4}], {"adamw": [1e-3], "sgd": [0.1]}, seeds=1, steps=2, every=1),
        ]
    return [
        Plan(
            "E1",
            [{"condition": c, "rank": r} for c in (10.0, 100.0) for r in (4, 16)],
            {"adamw": lr_grid(1e-3), "sgd": lr_grid(1e-3)},
            seeds=3,
            steps=400,
        ),
        Plan(
            "E2",
            [{"rank": 32}],
            {
                "adamw": lr_grid(1e-4, points=4, decades=1.5),
                "sgd": lr_grid(1e-2, points=4, decades=1.5),
            },
            seeds=3,
            steps=200,
            every=40,
        ),
    ]


def section(records: dict[str, dict], experiment_arms: list[Arm]) -> str:
    parts = [
        "## Preconditioner damping by optimizer (`scripts/benchmark_damping.py`)",
        "",
        "Riemannian at relative damping "
        + ", ".join(f"{d:g}" for d in DAMPINGS)
        + " against the plain optimizer, with AdamW and with SGD (momentum 0.9), through the "
        "convergence benchmark's harness and definitions.",
    ]
    for name, record in sorted(records.items()):
        grouped = report.group_runs(report.finished_runs(record), name, experiment_arms)
        plan = record["plan"]
        if name == "E1":
            table, _ = report.e1_tables(grouped, steps=plan["steps"], target=E1_TARGET)
            title = f"### E1, rank-4 target, up to {plan['steps']} steps, {plan['seeds']} seeds"
        else:
            table, _ = report.e2_tables(grouped)
            title = (
                f"### E2, the concept fine-tune, {plan['steps']} steps of batch 4, validation "
                f"every {plan['every']} steps, {plan['seeds']} seeds"
            )
        parts += ["", title, "", report.run_line(record), "", table]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one setting per arm, a few steps")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each")
    parser.add_argument("--only", choices=["E1", "E2"], help="run one experiment")
    parser.add_argument(
        "--report-only", action="store_true", help="the section from the last run's curves"
    )
    parser.add_argument("--no-write", action="store_true", help="print, leave the docs alone")
    args = parser.parse_args()
    import torch

    from modules.util.machine import benchmark_header
    from modules.util.markdown_section import report_benchmark

    raw = REPO / "workspace" / "benchmarks" / f"damping{'-quick' if args.quick else ''}.json"
    experiment_arms = arms()
    # the last run's curves of each experiment: --only keeps the other's, --report-only reads them
    records = json.loads(raw.read_text(encoding="utf-8"))["experiments"] if raw.is_file() else {}
    if args.report_only and not records:
        parser.error(f"no recorded runs in {raw}")
    if not args.report_only:
        torch.set_num_threads(1)  # as in each worker
        header = benchmark_header("scripts/benchmark_damping.py") + f" {args.workers} worker(s)."
        for plan in plans(args.quick):
            if args.only not in (None, plan.name):
                continue
            started, jobs = time.perf_counter(), jobs_of(plan, MODEL, experiment_arms)
            results = run_jobs(jobs, workers=args.workers)
            records[plan.name] = {
                "header": header,
                "minutes": (time.perf_counter() - started) / 60,
                "plan": {"steps": plan.steps, "seeds": plan.seeds, "every": plan.every},
                "jobs": len(jobs),
                "results": results,
            }
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({"experiments": records}), encoding="utf-8")  # the curves
    report_benchmark(section(records, experiment_arms), section="damping", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
