"""Training-step speed, peak memory and numerics per precision mode, side by side in one run.

Builds the tiny SDXL model, trains the same LoRA for a few steps in fp32, bf16 and (on CUDA) fp16
with loss scaling, and reports seconds per step (warm-up excluded), peak GPU memory and whether the
final loss and weights are finite.

Writes the table into docs/benchmarks.md (section `training-precision`) unless `--no-write`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from modules.config.loading import load_config
from modules.data.demo_dataset import write_demo_dataset
from modules.models.sdxl.tiny import build_tiny_sdxl
from modules.training.trainer import TrainingRun
from modules.util.machine import benchmark_header
from modules.util.markdown_section import report_benchmark

WEIGHT_DTYPE = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}


def measure(root: Path, precision: str, *, steps: int, warmup: int) -> dict[str, str]:
    dtype = WEIGHT_DTYPE[precision]
    parts = {"weight_dtype": dtype}
    raw = {
        "model": {
            "base_model": str(root / "model"),
            "unet": parts,
            "text_encoder": parts,
            "text_encoder_2": parts,
        },
        "lora": {"rank": 16, "alpha": 16, "layer_preset": "full"},
        "optimizer": {"learning_rate": 1e-3},
        "training": {"max_steps": steps, "batch_size": 4, "mixed_precision": precision},
        "data": {"resolution": 64, "concepts": [{"path": str(root / "data")}]},
        "sampling": {"at_end": False},
        "output": {"workspace_dir": str(root / f"run-{precision}")},
    }
    run = TrainingRun(load_config(raw=raw))
    times, losses = [], []
    original_step = run.pipeline.step

    def timed_step():
        outcome = original_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        losses.append(outcome.loss)
        return outcome

    run.pipeline.step = timed_step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run.run()
    per_step = (times[-1] - times[warmup - 1]) / (len(times) - warmup)
    finite = all(math.isfinite(x) for x in losses[-3:]) and all(
        torch.isfinite(p).all() for p in run.network.parameters()
    )
    peak = (
        f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if torch.cuda.is_available()
        else "n/a"
    )
    return {
        "mode": precision,
        "weights": dtype,
        "s/step": f"{per_step * 1000:.1f} ms",
        "peak memory": peak,
        "first loss": f"{losses[0]:.4f}",
        "last loss": f"{losses[-1]:.4f}",
        "finite": "yes" if finite else "NO",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where TrainingRun will train
    header_line = benchmark_header("scripts/benchmark_training.py", device)  # load before the run
    modes = ["no", "bf16", "fp16"] if torch.cuda.is_available() else ["no", "bf16"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_sdxl(root / "model")
        write_demo_dataset(root / "data", count=8, size=64)
        rows = [measure(root, mode, steps=args.steps, warmup=args.warmup) for mode in modes]
    header = list(rows[0])
    lines = [
        f"{header_line} "
        f"Tiny SDXL (1M-parameter UNet), LoRA rank 16 on `full` layers, batch 4 at 64 px, "
        f"{args.steps} steps, the first {args.warmup} excluded from the timing.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(row[h] for h in header) + " |" for row in rows),
    ]
    table = "\n".join(lines)
    report_benchmark(table, section="training-precision", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
