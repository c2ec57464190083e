"""Measure how the preconditioner's damping and B = 0 start handling behave, to pick defaults.

A LoRA (our LoRALinear, through the real LoRAPreconditioner hook) learns a low-rank correction
dW* of a frozen layer from regression data. dW* has rank 4 and a chosen condition number; the
LoRA has rank 4 (exact fit) or 8 (rank above the target's, where a tiny fixed damping was
reported unstable). Each damping variant trains with AdamW and with SGD over a grid of learning
rates and several seeds; we report the best final relative error |dW - dW*| / |dW*| over the grid
(median over seeds), and how many grid points diverged or stalled. Writes the table into
docs/benchmarks.md.

    python scripts/benchmark_damping.py [--steps 300] [--seeds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modules.lora.layers import LoRALinear  # noqa: E402
from modules.lora.preconditioning.linalg import Damping  # noqa: E402
from modules.lora.preconditioning.preconditioner import (  # noqa: E402
    LoRAPair,
    LoRAPreconditioner,
    PreconditionerSettings,
)
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

VARIANTS: dict[str, Damping | None] = {
    "none (plain optimizer)": None,
    "absolute 1e-6": Damping(relative=0.0, absolute=1e-6),
    "absolute 1e-2": Damping(relative=0.0, absolute=1e-2),
    "relative 1e-3": Damping(relative=1e-3, absolute=1e-8),
    "relative 1e-2": Damping(relative=1e-2, absolute=1e-8),
    "relative 3e-2": Damping(relative=3e-2, absolute=1e-8),
    "relative 1e-1": Damping(relative=1e-1, absolute=1e-8),
    "relative 1e-2 + identity start": Damping(relative=1e-2, absolute=1e-8, identity_below=1e-4),
}
LEARNING_RATES = {"adamw": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "sgd": [1e-2, 3e-2, 1e-1, 3e-1, 1.0]}


@dataclass(frozen=True)
class Problem:
    condition: float
    rank: int
    method: str = "riemannian"


def _target(size: int, condition: float, generator: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(size, 4, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(size, 4, generator=generator))
    singular = torch.logspace(0, -math.log10(condition), 4)
    return u @ torch.diag(singular) @ v.T


def train_once(
    problem: Problem, damping: Damping | None, *, optimizer: str, lr: float, seed: int, steps: int
) -> float:
    generator = torch.Generator().manual_seed(seed)
    size = 48
    base = nn.Linear(size, size, bias=False)
    nn.init.normal_(base.weight, std=size**-0.5, generator=generator)
    base.weight.requires_grad_(False)
    target = _target(size, problem.condition, generator)
    torch.manual_seed(seed)
    lora = LoRALinear(base=base, name="layer", rank=problem.rank, alpha=problem.rank)
    lora.attach()
    params = [lora.lora_down.weight, lora.lora_up.weight]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=lr)
    if damping is not None:
        settings = PreconditionerSettings(method=problem.method, damping=damping, seed=seed)
        pair = LoRAPair(a=params[0], b=params[1], scale=lora.scale, adapter=lora)
        LoRAPreconditioner([pair], settings).attach(opt)
    inputs = torch.randn(256, size, generator=generator)
    wanted = inputs @ (base.weight + target).T
    for _ in range(steps):
        loss = (base(inputs) - wanted).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    with torch.no_grad():
        error = (lora.merged_delta_weight() - target).norm() / target.norm()
    value = float(error)
    return value if math.isfinite(value) else float("inf")


def measure(problems: list[Problem], *, steps: int, seeds: int) -> list[dict]:
    rows = []
    for problem in problems:
        for optimizer, rates in LEARNING_RATES.items():
            for name, damping in VARIANTS.items():
                per_lr = {
                    lr: statistics.median(
                        train_once(
                            problem, damping, optimizer=optimizer, lr=lr, seed=seed, steps=steps
                        )
                        for seed in range(seeds)
                    )
                    for lr in rates
                }
                best_lr = min(per_lr, key=per_lr.get)
                rows.append(
                    {
                        "problem": problem,
                        "optimizer": optimizer,
                        "variant": name,
                        "best": per_lr[best_lr],
                        "best_lr": best_lr,
                        "failed": sum(1 for e in per_lr.values() if not e < 0.5),
                        "grid": len(rates),
                    }
                )
                print(
                    f"kappa={problem.condition:g} r={problem.rank} {optimizer:5s} {name:32s} "
                    f"best {per_lr[best_lr]:.2e} @ lr {best_lr:g}; "
                    + " ".join(f"{e:.1e}" for e in per_lr.values()),
                    flush=True,
                )
    return rows


def table(rows: list[dict], *, header_line: str, steps: int, seeds: int) -> str:
    lines = [
        f"{header_line} "
        f"Riemannian preconditioner, {steps} full-batch steps, median of {seeds} seeds. "
        "Cells: best final relative error |dW - dW*| / |dW*| over the learning-rate grid, and "
        "(in brackets) how many of the grid's learning rates ended above 0.5 (diverged or "
        "stalled).",
        "",
        "| target condition, LoRA rank | optimizer | " + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    keyed = {(id(r["problem"]), r["optimizer"], r["variant"]): r for r in rows}
    problems = list(dict.fromkeys(r["problem"] for r in rows))
    for problem in problems:
        for optimizer in LEARNING_RATES:
            cells = []
            for name in VARIANTS:
                row = keyed[(id(problem), optimizer, name)]
                cells.append(f"{row['best']:.1e} ({row['failed']}/{row['grid']})")
            lines.append(
                f"| kappa {problem.condition:g}, r {problem.rank} | {optimizer} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header_line = benchmark_header("scripts/benchmark_damping.py")  # load before the run
    torch.set_num_threads(1)
    problems = [Problem(condition=1.0, rank=4), Problem(condition=100.0, rank=4)]
    problems.append(Problem(condition=100.0, rank=8))
    rows = measure(problems, steps=args.steps, seeds=args.seeds)
    text = table(rows, header_line=header_line, steps=args.steps, seeds=args.seeds)
    report_benchmark(text, section="damping", write=not args.no_write)


if __name__ == "__main__":
    main()
