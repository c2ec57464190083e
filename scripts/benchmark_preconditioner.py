"""Speed of the LoRA gradient preconditioning pass at SDXL scale, against PEFT and an AdamW step.

Builds one rank-r LoRA per attention and MLP Linear layer of the SDXL base UNet (722 layers; the
base layers live on the meta device, only their (out, in) shapes matter) with random factors (B
nonzero, as in mid-training) and random gradients. Times, side by side in one run, the median of
`--repeats` rounds; every round restores the same gradients (untimed) before each method:

- ours, Riemannian / AdaPreLoRA: `LoRAPreconditioner.precondition()` with default damping. The
  AdaPreLoRA sketches are filled with random numbers once: only the optimizer-side pass (moment
  update, weights, r x r algebra) is timed; the sketches' backward cost is in the step benchmark;
- PEFT: the step of `peft.optimizers.create_riemannian_optimizer(...)` around an optimizer whose
  own update does nothing, on the same Parameters (named `lora_A` / `lora_B` for it);
- AdamW: one `torch.optim.AdamW(foreach=True)` step over the same parameters, for scale.

AdaPreLoRA also takes its sketches in the backward pass: one SDXL-sized layer's forward and
backward is timed without and with its tap (`--tap-rounds`).

ours/PEFT is the median of the per-round ratios, so load from other jobs that changes between
rounds cancels. The whole training step: `scripts/benchmark_preconditioner_step.py`.

    python scripts/benchmark_preconditioner.py [--ranks 16 64] [--repeats 15] [--threads 2]
        [--device cuda --dtype bfloat16] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft.optimizers import create_riemannian_optimizer  # noqa: E402
from torch import nn  # noqa: E402

from modules.lora.layers import LoRALinear  # noqa: E402
from modules.lora.preconditioning import LoRAPreconditioner, Settings  # noqa: E402
from modules.lora.preconditioning.statistics import GroupStatistics, ProbeSource  # noqa: E402
from modules.util.dtypes import DTYPES  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

METHODS = ["ours, Riemannian", "ours, AdaPreLoRA", "PEFT", "AdamW (foreach)"]
TARGET = 0.5  # on the CPU, at rank 16: our Riemannian pass at most half of PEFT's time
CROSS_ATTENTION_DIM = 2048  # SDXL's concatenated text-encoder width
# (inner dim, Transformer2DModels, transformer blocks in each) of the SDXL base UNet's attention
# blocks: down_blocks.1, down_blocks.2, mid_block, up_blocks.0, up_blocks.1
SDXL_TRANSFORMERS = [(640, 2, 2), (1280, 2, 10), (1280, 1, 10), (1280, 3, 10), (640, 3, 2)]


def sdxl_linear_shapes() -> list[tuple[int, int]]:
    """(out, in) of the SDXL UNet's 722 attention and MLP Linear layers, in module order."""
    shapes = []
    for d, models, blocks in SDXL_TRANSFORMERS:
        for _ in range(models):
            shapes.append((d, d))  # proj_in (use_linear_projection)
            for _ in range(blocks):
                shapes += [(d, d)] * 4  # attn1 to_q, to_k, to_v, to_out.0
                shapes += [(d, d), (d, CROSS_ATTENTION_DIM), (d, CROSS_ATTENTION_DIM), (d, d)]
                shapes += [(8 * d, d), (d, 4 * d)]  # ff.net.0.proj (GEGLU), ff.net.2
            shapes.append((d, d))  # proj_out
    assert len(shapes) == 722, len(shapes)
    return shapes


class NoUpdate(torch.optim.SGD):
    """An optimizer whose own update does nothing: PEFT's step around it is its pass alone."""

    def step(self, closure: Callable | None = None) -> None:
        return None


class PeftNamed(nn.Module):
    """Our factor modules under the names PEFT pairs by (`layers.<i>.lora_A/B.weight`)."""

    def __init__(self, adapters: list[LoRALinear]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in adapters)
        for holder, adapter in zip(self.layers, adapters, strict=True):
            holder.lora_A, holder.lora_B = adapter.lora_down, adapter.lora_up


def build(rank: int, *, dtype: torch.dtype, device: torch.device) -> dict[str, Callable]:
    """The timed calls of each method, over one shared set of SDXL-shaped LoRA factors."""
    generator = torch.Generator(device=device).manual_seed(rank)

    def random(*shape: int, std: float) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
        return (values * std).to(dtype)

    adapters = []
    for out_features, in_features in sdxl_linear_shapes():
        with torch.device("meta"):
            base = nn.Linear(in_features, out_features, bias=False)
        with torch.device(device):
            name = f"layer{len(adapters)}"
            adapter = LoRALinear(base=base, name=name, rank=rank, alpha=rank).to(dtype)
        a, b = adapter.factors
        with torch.no_grad():
            a.copy_(random(*a.shape, std=in_features**-0.5))
            b.copy_(random(*b.shape, std=0.02))
        a.grad, b.grad = random(*a.shape, std=1e-3), random(*b.shape, std=1e-3)
        adapters.append(adapter)
    params = [p for adapter in adapters for p in adapter.factors]
    saved = [p.grad.clone() for p in params]
    riemannian = LoRAPreconditioner(adapters, Settings(method="riemannian"))
    adaprelora = LoRAPreconditioner(adapters, Settings(method="adaprelora"))
    for group in adaprelora.groups:
        for sketch in (group.statistics.sketch_rows, group.statistics.sketch_cols):
            sketch.copy_(torch.randn(sketch.shape, generator=generator, device=device))
    peft = create_riemannian_optimizer(PeftNamed(adapters), NoUpdate, lr=1.0)
    adamw = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    adamw.step()  # its state exists before the timing starts

    def restore() -> None:
        for param, grad in zip(params, saved, strict=True):
            param.grad.copy_(grad)

    timed = [riemannian.precondition, adaprelora.precondition, peft.step, adamw.step]
    return {"restore": restore, **dict(zip(METHODS, timed, strict=True))}


def measure(rank: int, args: argparse.Namespace) -> dict[str, list[float]]:
    device = torch.device(args.device)
    calls = build(rank, dtype=DTYPES[args.dtype], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for round_index in range(args.repeats + 2):  # two warm-up rounds
        for method in METHODS:
            calls["restore"]()
            sync()
            start = time.perf_counter()
            calls[method]()
            sync()
            if round_index >= 2:
                times[method].append(time.perf_counter() - start)
    return times


def tap_cost_at_sdxl_width(*, rounds: int, device: torch.device) -> tuple[float, float, float]:
    """A `to_q`-shaped SDXL Linear (1280 x 1280, batch 2 of 1024 tokens: 1024 px images at that
    UNet level), rank-16 LoRA, forward and backward, without and with AdaPreLoRA's tap in turns:
    (plain seconds, tapped seconds, median of the per-round ratios)."""
    width, tokens = 1280, 1024
    with torch.device(device):
        base = nn.Linear(width, width, bias=False).requires_grad_(False)
        adapter = LoRALinear(base=base, name="to_q", rank=16, alpha=16)
    adapter.attach()
    inputs = torch.randn(2, tokens, width, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def step() -> float:
        sync()
        start = time.perf_counter()
        base(inputs).square().mean().backward()
        sync()
        return time.perf_counter() - start

    plain, tapped = [], []
    for _ in range(rounds + 2):
        plain.append(step())
        taps = GroupStatistics([adapter], ProbeSource(size=8, seed=0))
        tapped.append(step())
        taps.remove()
    plain, tapped = plain[2:], tapped[2:]
    ratio = statistics.median(t / p for t, p in zip(tapped, plain, strict=True))
    return statistics.median(plain), statistics.median(tapped), ratio


def report(
    results: dict[int, dict[str, list[float]]],
    tap: tuple[float, float, float],
    args: argparse.Namespace,
) -> str:
    rows = [
        "| rank | LoRA params | " + " | ".join(METHODS) + " | ours/PEFT (Riemannian) |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    verdicts = []
    for rank, times in results.items():
        params = sum(rank * (m + n) for m, n in sdxl_linear_shapes()) / 1e6
        ratio = statistics.median(
            ours / peft for ours, peft in zip(times[METHODS[0]], times["PEFT"], strict=True)
        )
        cells = [f"{statistics.median(times[m]) * 1e3:.1f}" for m in METHODS]
        rows.append(f"| {rank} | {params:.1f} M | " + " | ".join(cells) + f" | {ratio:.2f} |")
        spread = [f"{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}" for t in times.values()]
        rows.append("| | (rounds: fastest-slowest) | " + " | ".join(spread) + " | |")
        if rank == 16 and args.device == "cpu":
            met = "met" if ratio <= TARGET else "NOT met"
            verdicts.append(f"rank 16 on the CPU, ours/PEFT <= {TARGET}: {ratio:.2f}, {met}")
    return "\n".join(
        [
            f"Pass over the 722 attention/MLP Linear LoRA layers of the SDXL UNet, {args.dtype} "
            "factors and gradients (float32 Grams and solves), median of "
            f"{args.repeats} rounds (ms); each round times every method once. ours/PEFT is the "
            "median of the per-round ratios.",
            "",
            *rows,
            "",
            *(f"Target: {verdict}." for verdict in verdicts),
            "",
            "AdaPreLoRA's statistics in the backward pass, at SDXL width (one 1280 x 1280 layer "
            "with a rank-16 LoRA, batch 2 of 1024 tokens, float32, forward and backward): "
            f"{tap[0] * 1e3:.1f} ms plain, {tap[1] * 1e3:.1f} ms with its tap "
            f"({100 * (tap[2] - 1):+.1f}%, median of the per-round ratios).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tap-rounds", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = benchmark_header("scripts/benchmark_preconditioner.py", args.device)
    results = {rank: measure(rank, args) for rank in args.ranks}
    tap = tap_cost_at_sdxl_width(rounds=args.tap_rounds, device=torch.device(args.device))
    on_gpu = args.device.startswith("cuda")
    title = f"## LoRA gradient preconditioner speed{' on a GPU' if on_gpu else ''}"
    text = "\n\n".join(
        [f"{title} (`scripts/benchmark_preconditioner.py`)", header, report(results, tap, args)]
    )
    section = "preconditioner_speed_gpu" if on_gpu else "preconditioner_speed"
    report_benchmark(text, section=section, write=not args.no_write)


if __name__ == "__main__":
    main()
