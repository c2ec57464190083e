"""Data pipeline speed: scanning, decoding and bucketing throughput, and the loader's share of a step.

1. Writes a folder of photo-like JPEGs of mixed sizes and aspect ratios, then measures images per
   second for the first scan (hash + verify every file), a rescan (scan index hit), and decoding
   into 1024 px buckets through the loader, in the training process and with worker processes.
2. Trains the tiny SDXL model twice on the same config: fed by the real loader from cached latents
   and text embeddings, and fed the very same batches from memory tensors. The difference is what
   the loader costs per step.

Writes the tables into docs/benchmarks.md (section `data-pipeline`) unless `--no-write`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from modules.config.loading import load_config
from modules.data.demo_dataset import write_demo_dataset
from modules.data.pipeline import DataPipeline
from modules.models.sdxl.tiny import build_tiny_sdxl
from modules.training.trainer import TrainingRun
from modules.util.machine import benchmark_header
from modules.util.markdown_section import report_benchmark


def write_photos(folder: Path, count: int) -> None:
    """Smooth gradients plus grain, JPEG quality 90: sizes and decode cost like real photos."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = (int(s) for s in rng.integers(768, 1800, 2))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(base + grain + rng.integers(0, 55, 3), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
        (folder / f"{index:04d}.txt").write_text(f"photo {index}, grain", encoding="utf-8")


def data_config(root: Path, folder: Path, **data: object) -> dict:
    return {
        "data": {"resolution": 1024, "concepts": [{"path": str(folder)}], **data},
        "output": {"workspace_dir": str(root / "ws")},
    }


def throughput(root: Path, folder: Path, count: int, workers: list[int]) -> list[dict[str, str]]:
    rows = []
    start = time.perf_counter()
    pipeline = DataPipeline(load_config(raw=data_config(root, folder)), latent_multiple=64)
    rows.append(("scan: hash + verify (threads)", count / (time.perf_counter() - start)))
    start = time.perf_counter()
    DataPipeline(load_config(raw=data_config(root, folder)), latent_multiple=64)
    rows.append(("rescan (scan index)", count / (time.perf_counter() - start)))
    for n in workers:
        pipeline.config.data.workers = n
        pipeline.shard(batch_size=4, seed=0, rank=0, world=1)
        batches = pipeline.order.micro_per_epoch
        with pipeline.stream(start=0) as stream:
            next(stream)  # workers started, first batch in
            start = time.perf_counter()
            images = sum(len(next(stream)[1]) for _ in range(batches - 1))
        rate = images / (time.perf_counter() - start)
        rows.append((f"decode + resize + crop into 1024 px buckets, {n} workers", rate))
    return [{"stage": stage, "images/s": f"{rate:.1f}"} for stage, rate in rows]


def step_times(root: Path, *, steps: int, warmup: int, from_memory: bool) -> float:
    raw = {
        "model": {"base_model": str(root / "model")},
        "lora": {"rank": 16, "alpha": 16, "layer_preset": "full"},
        "training": {"max_steps": steps, "batch_size": 4},
        "data": {"resolution": 64, "concepts": [{"path": str(root / "small")}], "flip": True},
        "sampling": {"at_end": False},
        "output": {"workspace_dir": str(root / ("memory" if from_memory else "cached"))},
    }
    run = TrainingRun(load_config(raw=raw))
    if from_memory:
        batches = [run.dataset.load(p) for p in range(steps)]

        @contextlib.contextmanager
        def from_tensors(start: int):
            yield iter(batches[start:])

        run.dataset.stream = from_tensors
    times: list[float] = []
    original_step = run.pipeline.step

    def timed_step():
        outcome = original_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        return outcome

    run.pipeline.step = timed_step
    run.run()
    return float(np.median(np.diff(times[warmup - 1 :])))  # median: robust to a noisy machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header_line = benchmark_header("scripts/benchmark_data.py")  # load before the run
    workers = sorted({0, 2, min(8, os.cpu_count() or 1)})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photos(root / "photos", args.images)
        rows = throughput(root, root / "photos", args.images, workers)
        build_tiny_sdxl(root / "model")
        write_demo_dataset(root / "small", count=16, size=64)
        timings: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):  # alternate, so drifting machine load hits both alike
            for from_memory in (False, True):
                timings[from_memory].append(
                    step_times(root, steps=args.steps, warmup=args.warmup, from_memory=from_memory)
                )
        cached, memory = min(timings[False]), min(timings[True])
    overhead = (cached - memory) / memory * 100
    lines = [
        f"{header_line} {args.images} photo-like JPEGs of 768-1800 px per side, batch 4.",
        "",
        "| stage | images/s |",
        "| --- | --- |",
        *(f"| {row['stage']} | {row['images/s']} |" for row in rows),
        "",
        f"Training step, tiny SDXL (LoRA rank 16 `full`, batch 4 at 64 px, random flip), "
        f"median step of {args.steps} (the first {args.warmup} excluded), best of "
        f"{args.rounds} alternating rounds:",
        "",
        "| fed by | s/step |",
        "| --- | --- |",
        f"| data loader, cached latents + text embeddings | {cached * 1000:.1f} ms |",
        f"| the same batches from memory tensors | {memory * 1000:.1f} ms |",
        f"| loader cost | {overhead:+.1f}% of a step |",
    ]
    table = "\n".join(lines)
    report_benchmark(table, section="data-pipeline", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
