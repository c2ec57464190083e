"""What AdaPreLoRA's sketched gradient statistics change in training, against exact statistics.

AdaPreLoRA weights the LoRA factor gradients by Adafactor-style row and column second moments of
each adapted layer's full weight gradient G = dL/dW (m x n). The trainer never forms G: its
`SketchStatistics` accumulates two thin random sketches per layer in the backward pass (p probes,
`lora.adaprelora_probes`, default 8) and estimates the row and column mean squares from them,
unbiased but noisy. This script swaps in `ExactStatistics` (below) through the `GradientStatistics`
protocol: the base layer's own weight gradient is G (W_eff = W0 + s B A, so dL/dW0 = dL/dW_eff),
so it turns on `requires_grad` of each adapted base weight (never handing it to the optimizer),
reads `weight.grad` (Conv2d flattened to (out, in*kh*kw)) and takes exact row and column mean
squares.

Effect on training: the real `TrainingRun` on the tiny SDXL model (built in a temporary folder
with the demo data set; LoRA rank 8 on every layer, `layer_preset` full, AdamW at lr 3e-3, no
weight decay, no clipping, batch 2 at 64 px, fp32), `--steps` steps for each of `--seeds` seeds
and each setting: exact statistics, the sketch at p = 2, 8, 32, and for reference Riemannian
preconditioning (no statistics) and plain AdamW (preconditioning off). The seed fixes the data
order, the diffusion noise and the sketch probes, so settings of one seed see the same batches and
the same noise. Reported per setting (median over seeds):

- the mean training loss over the last 20% of steps;
- how far the final LoRA lands from the exact-statistics run of the same seed:
  sqrt(sum_layers |dW - dW_exact|^2) / sqrt(sum_layers |dW_exact|^2), dW = s B A;
- for the sketches, how well they estimate the statistics, measured ALONGSIDE the exact runs: each
  exact run also carries sketches at p = 2, 8, 32 (same probe seeds as the sketch runs would draw),
  fed the same gradients but only observed. Per layer, the relative error |e_sketch - e_exact| /
  |e_exact| of one step's row (and column) energies (mean over steps), and that of the final
  Adafactor moments (after the beta2 moving average), each the median over layers. Measuring them
  on the exact trajectory compares like with like; the loss and dW columns show what the noise
  does when the sketch actually steers the run.

Cost: `scripts/benchmark_preconditioner_step.py` times exact statistics and the sketch step by step,
side by side with the other settings. Memory: exact statistics by this route keep a
full m x n gradient per adapted layer (it must survive gradient accumulation); for SDXL's 722
attention/MLP Linear layers (shapes from `sdxl_linear_shapes()` in
scripts/benchmark_preconditioner.py) that is sum m n * 4 bytes at fp32, against (m + n) p * 4
bytes for the sketches.

Writes the tables into docs/benchmarks.md (section `adaprelora_statistics`) unless `--no-write`.

    python scripts/benchmark_adaprelora_statistics.py [--steps 40] [--seeds 3] [--threads 2]
        [--no-write]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from benchmark_preconditioner import sdxl_linear_shapes  # noqa: E402
from exact_statistics import Alongside, relative_errors, use_exact_statistics  # noqa: E402

from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

PROBES = (2, 8, 32)
EVERY_4 = "sketch p=8, every 4 steps"  # lora.adaprelora_statistics_every = 4


# -- one training run ------------------------------------------------------------------------------


def training_config(root: Path, setting: str, *, steps: int, seed: int, name: str) -> dict:
    """As tests/test_preconditioner_training.py: rank 8 on every layer, lr 3e-3, no clipping."""
    lora: dict = {"rank": 8, "alpha": 8, "layer_preset": "full"}
    if setting == "riemannian":
        lora["preconditioner"] = "riemannian"
    elif setting != "off":
        lora |= {"preconditioner": "adaprelora"}
        if setting == EVERY_4:
            lora["adaprelora_statistics_every"] = 4
        elif setting.startswith("sketch p="):
            lora["adaprelora_probes"] = int(setting.removeprefix("sketch p="))
    return {
        "model": {"base_model": str(root / "model")},
        "lora": lora,
        "optimizer": {"learning_rate": 3e-3, "weight_decay": 0.0},
        "training": {"max_steps": steps, "batch_size": 2, "seed": seed, "max_grad_norm": 0},
        "data": {"resolution": 64, "concepts": [{"path": str(root / "data")}]},
        "sampling": {"prompts": [], "at_end": False},
        "output": {"workspace_dir": str(root / name), "name": "bench-lora"},
    }


def train(raw: dict, setting: str, *, alongside: tuple[int, ...] = ()) -> dict:
    """Losses, step end times and final dW of one real run, plus the observer when there is one."""
    from modules.config.loading import load_config
    from modules.training.trainer import TrainingRun

    run = TrainingRun(load_config(raw=raw))
    observer = use_exact_statistics(run, alongside=alongside) if setting == "exact" else None
    losses: list[float] = []
    stamps: list[float] = []
    original_step = run.pipeline.step

    def recorded_step():
        outcome = original_step()
        stamps.append(time.perf_counter())
        losses.append(float(outcome.loss))
        return outcome

    run.pipeline.step = recorded_step
    run.run()
    with torch.no_grad():
        deltas = {
            name: adapter.merged_delta_weight().detach().float().clone()
            for name, adapter in run.network.adapters.items()
        }
    moments = (
        [(m.rows.clone(), m.cols.clone()) for m in run.preconditioner.moments]
        if run.preconditioner is not None and run.preconditioner.moments
        else None
    )
    if run.preconditioner is not None:
        run.preconditioner.detach()
    return {
        "losses": losses,
        "stamps": stamps,
        "deltas": deltas,
        "moments": moments,
        "observer": observer,
    }


# -- the measurements -------------------------------------------------------------------------------


def delta_difference(deltas: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    diff = sum(float((deltas[k] - exact[k]).square().sum()) for k in exact)
    norm = sum(float(exact[k].square().sum()) for k in exact)
    return math.sqrt(diff / norm)


def sketch_agreement(observer: Alongside, exact_moments: list) -> dict[int, dict[str, float]]:
    """Per p: median over layers of the per-step energy error (mean over steps) and of the final
    moments' error, rows and columns."""
    result = {}
    for p, per_group in observer.step_errors.items():
        step_rows = torch.cat([torch.stack([r for r, _ in steps]).mean(0) for steps in per_group])
        step_cols = torch.cat([torch.stack([c for _, c in steps]).mean(0) for steps in per_group])
        final_rows = torch.cat(
            [
                relative_errors(m.rows, rows)
                for m, (rows, _) in zip(observer.moments[p], exact_moments, strict=True)
            ]
        )
        final_cols = torch.cat(
            [
                relative_errors(m.cols, cols)
                for m, (_, cols) in zip(observer.moments[p], exact_moments, strict=True)
            ]
        )
        result[p] = {
            "step rows": float(step_rows.median()),
            "step cols": float(step_cols.median()),
            "final rows": float(final_rows.median()),
            "final cols": float(final_cols.median()),
        }
    return result


def settings_list() -> list[str]:
    return ["exact", *(f"sketch p={p}" for p in PROBES), EVERY_4, "riemannian", "off"]


def effect(args: argparse.Namespace, root: Path) -> dict:
    names = settings_list()
    loss_tail: dict[str, list[float]] = {name: [] for name in names}
    first_loss: list[float] = []
    difference: dict[str, list[float]] = {name: [] for name in names if name != "exact"}
    agreement: list[dict[int, dict[str, float]]] = []
    tail = max(1, round(args.steps * 0.2))
    for seed in range(args.seeds):
        exact_deltas = None
        for name in names:  # exact first: the others are compared with it
            start = time.perf_counter()
            raw = training_config(root, name, steps=args.steps, seed=seed, name=f"e{seed}-{name}")
            result = train(raw, name, alongside=PROBES if name == "exact" else ())
            losses = result["losses"]
            loss_tail[name].append(statistics.fmean(losses[-tail:]))
            if name == "exact":
                exact_deltas = result["deltas"]
                first_loss.append(losses[0])
                agreement.append(sketch_agreement(result["observer"], result["moments"]))
            else:
                difference[name].append(delta_difference(result["deltas"], exact_deltas))
            print(
                f"seed {seed} {name:12s}: loss {losses[0]:.4f} -> last 20% "
                f"{loss_tail[name][-1]:.4f}"
                + (f", dW diff from exact {difference[name][-1]:.3f}" if name != "exact" else "")
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    agree = {
        p: {key: statistics.median(a[p][key] for a in agreement) for key in agreement[0][p]}
        for p in PROBES
    }
    return {
        "loss": {name: statistics.median(values) for name, values in loss_tail.items()},
        "loss spread": {name: (min(v), max(v)) for name, v in loss_tail.items()},
        "first loss": statistics.median(first_loss),
        "difference": {name: statistics.median(values) for name, values in difference.items()},
        "agreement": agree,
        "tail": tail,
    }


def memory() -> dict[str, float]:
    shapes = sdxl_linear_shapes()
    exact = sum(m * n * 4 for m, n in shapes)
    sketch = sum((m + n) * 8 * 4 for m, n in shapes)
    return {"layers": len(shapes), "exact": exact, "sketch": sketch}


# -- the report -------------------------------------------------------------------------------------

LABELS = {
    "exact": "exact statistics",
    "sketch p=2": "sketch, p = 2",
    "sketch p=8": "sketch, p = 8 (default)",
    "sketch p=32": "sketch, p = 32",
    EVERY_4: "sketch, p = 8, every 4th step",
    "riemannian": "Riemannian (no statistics)",
    "off": "plain AdamW (preconditioning off)",
}


def effect_table(result: dict, args: argparse.Namespace) -> str:
    exact_loss = result["loss"]["exact"]
    lines = [
        f"Effect on training: tiny SDXL model, the real `TrainingRun` (LoRA rank 8, "
        f"`layer_preset` full, AdamW lr 3e-3, no weight decay or clipping, batch 2 at 64 px, "
        f"fp32), {args.steps} steps, {args.seeds} seeds (median over seeds; the range in "
        f"brackets). First-step loss {result['first loss']:.3f}. Energy errors: sketches run "
        "alongside the exact-statistics runs (same gradients, observed only), per layer "
        "|e_sketch - e_exact| / |e_exact| of the row / column energies, median over layers; "
        "'one step' is the mean over steps of each step's error, 'moments' the error of the "
        "final Adafactor moments (beta2 0.999).",
        "",
        f"| statistics | loss, last {result['tail']} steps | vs exact "
        "| dW diff. from exact | energy error, one step (rows / cols) "
        "| energy error, moments (rows / cols) |",
        "|---|---|---|---|---|---|",
    ]
    for name in settings_list():
        loss = result["loss"][name]
        low, high = result["loss spread"][name]
        vs = f"{100 * (loss / exact_loss - 1):+.1f}%" if name != "exact" else ""
        diff = f"{result['difference'][name]:.3f}" if name != "exact" else "0"
        if name.startswith("sketch p=") and name != EVERY_4:
            a = result["agreement"][int(name.removeprefix("sketch p="))]
            step = f"{a['step rows']:.3f} / {a['step cols']:.3f}"
            final = f"{a['final rows']:.3f} / {a['final cols']:.3f}"
        else:
            step = final = ""
        lines.append(
            f"| {LABELS[name]} | {loss:.4f} ({low:.4f}-{high:.4f}) | {vs} | {diff} "
            f"| {step} | {final} |"
        )
    return "\n".join(lines)


def memory_line(mem: dict) -> str:
    return (
        f"Memory at SDXL scale ({mem['layers']} attention/MLP Linear layers, fp32): exact "
        f"statistics through the base weight gradients keep a full m x n gradient per layer, "
        f"{mem['exact'] / 2**30:.2f} GiB; the p = 8 sketches take {mem['sketch'] / 2**20:.1f} MiB "
        "(both survive gradient accumulation). Step time of exact statistics against the sketch: "
        "`scripts/benchmark_preconditioner_step.py`, section below."
    )


def reading(effect_result: dict, mem: dict) -> str:
    loss, diff = effect_result["loss"], effect_result["difference"]
    exact = loss["exact"]

    def pct(name: str) -> str:
        return f"{100 * (loss[name] / exact - 1):+.1f}%"

    sketch_names = [f"sketch p={p}" for p in PROBES]
    worst = max(sketch_names, key=lambda name: abs(loss[name] / exact - 1))
    low, high = effect_result["loss spread"]["exact"]
    seed_spread = 100 * (high - low) / exact
    sketch_dw = ", ".join(
        f"{diff[name]:.3f} at p = {name.removeprefix('sketch p=')}" for name in sketch_names
    )
    a8 = effect_result["agreement"][8]
    sketch_loss = ", ".join(f"{pct(n)} (p = {n.removeprefix('sketch p=')})" for n in sketch_names)
    sentences = [
        f"Training with the sketch ends at a loss {sketch_loss} from exact statistics "
        f"(largest gap: {worst.removeprefix('sketch ')}, {pct(worst)}), "
        f"against {pct('riemannian')} for Riemannian and {pct('off')} for plain AdamW; the "
        f"exact runs themselves span {seed_spread:.1f}% across seeds.",
        f"The final LoRA differs from the exact-statistics one by {sketch_dw} (relative dW), "
        f"against {diff['riemannian']:.3f} for Riemannian and {diff['off']:.3f} for AdamW, so "
        + (
            "the sketch's noise moves the result less than changing the method does."
            if max(diff[n] for n in sketch_names) < min(diff["riemannian"], diff["off"])
            else "the sketch's noise moves the result about as much as changing the method."
        ),
        f"At p = 8 one step's energies are off by {a8['step rows']:.2f} / {a8['step cols']:.2f} "
        f"(rows / cols, median layer; sqrt(2/p) = 0.50 is what p Gaussian probes give a "
        "single energy) and the moving-average moments by "
        f"{a8['final rows']:.2f} / {a8['final cols']:.2f}.",
        f"Sketching only every 4th step (`lora.adaprelora_statistics_every` 4) ends at "
        f"{pct(EVERY_4)} from exact, against {pct('sketch p=8')} sketching every step.",
        f"Exact statistics would need {mem['exact'] / 2**30:.1f} GiB of gradient memory at SDXL "
        f"scale against {mem['sketch'] / 2**20:.0f} MiB for the sketch.",
    ]
    return " ".join(sentences)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = benchmark_header("scripts/benchmark_adaprelora_statistics.py")  # load before the run
    started = time.perf_counter()

    from modules.data.demo_dataset import write_demo_dataset
    from modules.models.sdxl.tiny import build_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_sdxl(root / "model")
        write_demo_dataset(root / "data", count=8, size=64)
        effect_result = effect(args, root)
    mem = memory()
    elapsed = time.perf_counter() - started
    text = "\n".join(
        [
            "## AdaPreLoRA statistics: sketch against exact "
            "(`scripts/benchmark_adaprelora_statistics.py`)",
            "",
            header + f" Run time {elapsed / 60:.1f} min.",
            "",
            effect_table(effect_result, args),
            "",
            memory_line(mem),
            "",
            reading(effect_result, mem),
        ]
    )
    report_benchmark(text, section="adaprelora_statistics", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
