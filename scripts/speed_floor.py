"""Timing on CPU or GPU, and the floor a pass over LoRA stacks cannot beat, for the benchmarks.

`clock` times a call to the end of its device work; `floor_probes` times a large copy and fp32
bmms shaped like a preconditioning pass's Grams and products, and `floor_estimate` turns those
times into the memory-traffic and matmul floors of `scripts/benchmark_preconditioner.py`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def clock(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of `fn()` to the end of its device work, with the garbage collector off (as
    `timeit` does): a collection that PEFT's per-layer temporaries trigger would otherwise land
    in whichever pass happens to run next."""
    sync()
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    finally:
        if collecting:
            gc.enable()


@dataclass
class FloorProbes:
    """Operations timed alongside the passes, interleaved with them, for the floor's inputs."""

    copy_bytes: int  # read plus written by one `copy`
    bmm_flops: int  # of one timed call of the Gram-shaped or product-shaped bmms
    ops: dict[str, Callable[[], object]]


def floor_probes(rank: int, device: torch.device) -> FloorProbes:
    """A 256 MiB copy, and fp32 bmms shaped like the pass's Grams and products (rank r, 60
    layers of width 1280, the size of one of the larger groups), each repeated back to back to
    about 1 GFLOP per timed call so that waking the thread pool is not part of the rate."""
    source = torch.randn(64 * 2**20, device=device)
    target = torch.empty_like(source)
    k, width = 60, 1280
    a = torch.randn(k, rank, width, device=device)
    inverse = torch.randn(k, rank, rank, device=device)
    gram, product = torch.empty(k, rank, rank, device=device), torch.empty_like(a)
    flops = 2 * k * rank * rank * width
    repeats = max(1, round(1e9 / flops))

    def grams() -> None:
        for _ in range(repeats):
            torch.bmm(a, a.mT, out=gram)

    def products() -> None:
        for _ in range(repeats):
            torch.bmm(inverse, a, out=product)

    return FloorProbes(
        copy_bytes=2 * source.numel() * source.element_size(),
        bmm_flops=repeats * flops,
        ops={
            "copy": lambda: target.copy_(source),
            "bmm, Gram-shaped": grams,
            "bmm, product-shaped": products,
        },
    )


def floor_estimate(
    seconds: dict[str, float], probes: FloorProbes, *, traffic: int, flops: float
) -> tuple[float, dict[str, float], float, float]:
    """(copy bandwidth, bmm throughputs, memory floor, matmul floor) from the probes' times."""
    bandwidth = probes.copy_bytes / seconds["copy"]
    throughput = {
        kind: probes.bmm_flops / seconds[f"bmm, {kind}-shaped"] for kind in ("Gram", "product")
    }
    return bandwidth, throughput, traffic / bandwidth, flops / max(throughput.values())
