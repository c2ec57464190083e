"""Why does Riemannian preconditioning not speed up AdamW on the concept fine-tune (E2)?

Longer runs than E2's 40 steps of the same task (`ConceptProblem`: the `make demo` concept on the
pretrained tiny world model, same data order, noise and LoRA start per seed), AdamW with and
without the preconditioner and the changes the issue names as suspects: Adam's betas (0.7/0.8,
as the paper's scaled AdamW, with its control) and the damping. Besides the validation loss (8
held-out images of the concept) it measures the same loss on the 12 training images: a method
that fits them faster can still generalise worse.

Besides the losses it measures what the preconditioner can change for Adam at all. Adam divides
each coordinate by its own running scale, so multiplying a layer's gradient by a constant changes
nothing; `(s^2 B^T B + lam I)^-1` is such a constant when the damped Gram is a multiple of the
identity. Its condition number (largest over smallest eigenvalue) says how far from a constant
the preconditioner is: 1 means it is invisible to Adam. Reported per side, median over layers,
after a short and after the full run at each variant's best learning rate.

    python scripts/convergence_ablation.py [--steps 200] [--seeds 2] [--rank 32] [--workers 2]
        [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

MODEL = REPO / "resources" / "tiny-world-sdxl"
RIEMANNIAN = {"lora": {"preconditioner": "riemannian"}}
BETAS = {"optimizer": {"betas": [0.7, 0.8]}}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "AdamW": [],
    "AdamW + Riemannian": [RIEMANNIAN],
    "AdamW, betas 0.7/0.8": [BETAS],
    "AdamW + Riemannian, betas 0.7/0.8": [RIEMANNIAN, BETAS],
    "AdamW + Riemannian, damping 0.01": [
        {"lora": {"preconditioner": "riemannian", "precondition_damping": 0.01}}
    ],
    "AdamW + Riemannian, damping 0.001": [
        {"lora": {"preconditioner": "riemannian", "precondition_damping": 0.001}}
    ],
}
LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3]

_PROBLEMS: dict[int, Any] = {}


def gram_conditioning(network, relative: float = 0.1) -> tuple[float, float]:
    """Median over layers of the damped B-side and A-side Grams' condition numbers."""
    sides: tuple[list[float], list[float]] = ([], [])
    for adapter in network.adapters.values():
        a, b = (t.detach().double().flatten(1) for t in adapter.factors)
        s2 = adapter.scale**2
        for side, gram in zip(sides, (s2 * b.T @ b, s2 * a @ a.T), strict=True):
            damped = gram + (relative * gram.diagonal().mean() + 1e-8) * torch.eye(len(gram))
            eigenvalues = torch.linalg.eigvalsh(damped)
            side.append(float(eigenvalues[-1] / eigenvalues[0]))
    return statistics.median(sides[0]), statistics.median(sides[1])


def _run(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from scripts.convergence_problems import ConceptProblem, arm_config

    rank = job["rank"]
    if rank not in _PROBLEMS:
        _PROBLEMS[rank] = ConceptProblem(model=MODEL, rank=rank, accelerator=Accelerator(cpu=True))
    problem = _PROBLEMS[rank]
    config = arm_config(
        {"model": {"base_model": str(MODEL)}},
        {"optimizer": {"name": "adamw"}},
        *VARIANTS[job["variant"]],
        lr=job["lr"],
        rank=rank,
    )
    curve = problem.run(config, seed=job["seed"], steps=job["steps"], every=job["every"])
    fit = problem.training_set_loss(config)
    return {
        **job,
        "start": curve.values[0],  # B = 0: the base model's loss
        "final": curve.final,
        "best": curve.best,
        "fit": fit,
        "grams": gram_conditioning(problem.network),
    }


def run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_run, jobs, chunksize=1))


def table(results: list[dict[str, Any]], base_loss: float, args: argparse.Namespace) -> str:
    def cell(variant: str, lr: float, key: str = "final") -> float:
        values = [
            r[key]
            for r in results
            if (r["variant"], r["lr"], r["steps"]) == (variant, lr, args.steps)
        ]
        return statistics.median(values)

    lines = [
        f"LoRA rank {args.rank}, {args.steps} steps of batch 4, {args.seeds} seed(s); by AdamW "
        "learning rate, the final validation loss / the same loss on the training images "
        f"(medians over seeds; the base model's validation loss is {base_loss:.4f}). Gram "
        "conditioning: median over layers of the damped B-side / A-side Gram's condition number "
        f"(1: the preconditioner is a per-layer constant, which Adam cancels), after "
        f"{args.short} steps and after {args.steps}, at the variant's best learning rate.",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in args.rates) + " | best | Grams, "
        f"{args.short} steps | Grams, {args.steps} steps |",
        "|---|" + "---|" * (len(args.rates) + 3),
    ]
    for variant in args.variants:
        finals = [cell(variant, lr) for lr in args.rates]
        best_lr = args.rates[finals.index(min(finals))]

        def grams(steps: int, variant=variant, best_lr=best_lr) -> str:
            found = [
                r["grams"]
                for r in results
                if (r["variant"], r["lr"], r["steps"]) == (variant, best_lr, steps)
            ]
            b_side = statistics.median(g[0] for g in found)
            a_side = statistics.median(g[1] for g in found)
            return f"{b_side:.1f} / {a_side:.1f}"

        cells = " | ".join(
            f"{value:.4f} / {cell(variant, lr, 'fit'):.4f}"
            for value, lr in zip(finals, args.rates, strict=True)
        )
        lines.append(
            f"| {variant} | {cells} | {min(finals):.4f} | {grams(args.short)} | "
            f"{grams(args.steps)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--short", type=int, default=20, help="steps of the early Gram reading")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="two variants, one rate, 2 steps, one seed"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.variants, args.rates = list(VARIANTS), LEARNING_RATES
    if args.quick:  # a smoke run: every part, nothing measured
        args.variants, args.rates = args.variants[:2], [1e-3]
        args.steps, args.short, args.seeds = 2, 1, 1
    torch.set_num_threads(1)  # as in each worker
    header = benchmark_header("scripts/convergence_ablation.py")
    started = time.perf_counter()
    jobs = [
        {"variant": variant, "lr": lr, "seed": seed, "rank": args.rank, "steps": steps}
        | {"every": max(steps // 5, 1)}
        for steps in (args.steps, args.short)
        for seed in range(args.seeds)
        for variant in args.variants
        for lr in args.rates
    ]
    results = run_all(jobs, args.workers)
    base_loss = results[0]["start"]
    minutes = (time.perf_counter() - started) / 60
    title = "## Convergence ablation: AdamW and the preconditioner on the concept fine-tune"
    text = "\n\n".join(
        [
            f"{title} (`scripts/convergence_ablation.py`)",
            f"{header} Run time {minutes:.1f} min.",
            table(results, base_loss, args),
        ]
    )
    report_benchmark(text, section="convergence_ablation", write=not args.no_write)


if __name__ == "__main__":
    main()
