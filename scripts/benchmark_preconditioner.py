"""Speed of the LoRA gradient preconditioner at SDXL scale, against PEFT, AdamW and a floor.

The optimizer-side pass alone. Builds one LoRA factor set per attention and MLP Linear
layer of the SDXL base UNet (722 layers; only their (out, in) shapes, no UNet is built): plain
`nn.Parameter`s A (r x in) and B (out x r) with random values (B nonzero, as in mid-training) and
random gradients, served by our real `LoRAPreconditioner` (which packs them into per-shape stacks).
Times, side by side in one run, the median of `--repeats` passes after a warm-up, with the same
gradients restored (untimed) before every pass:

- ours, Riemannian: `LoRAPreconditioner.precondition()`, method "riemannian", default damping;
- on a GPU also ours, Riemannian without the CUDA graph it is replayed as there (the kernels
  launched one by one from Python), and ours queued behind other GPU work;
- ours, AdaPreLoRA: the same with method "adaprelora". Its row/column statistics come from
  sketches taken in each adapted layer's backward pass; here the layers and their LoRA modules
  are stand-ins on the meta device (never run) and the sketch buffers are filled with random
  numbers, because only the optimizer-side pass (moment update, weights, r x r algebra) is
  measured;
- PEFT: `peft.optimizers.riemannian._RiemannianPreconditioner(pairs, reg=1e-2).step()` on the same
  Parameter objects (after our packing they are views into the stacks, which PEFT does not mind);
- AdamW: one `torch.optim.AdamW(foreach=True)` step over the same parameters (state initialised
  by a warm-up step), for scale.

The floor (`scripts/speed_floor.py`) is the larger of two lower bounds: the memory traffic the
pass cannot avoid (read A, B, g_A, g_B, write g_A, g_B) at the bandwidth of a 256 MiB tensor
copy, and the matmul work (`4 r^2 (m + n)` flops per layer: two Grams and two products) at the
faster of two fp32 bmm throughputs at the pass's shapes (Gram-like and product-like, rank r, 60
layers of width 1280: 5 MiB at rank 16, so mostly an in-cache rate, which the real stacks
streamed from memory do not quite reach).
The copy and the bmms are timed in the same interleaved loop as the passes, so every round times
each method and probe once; ours/PEFT and ours/floor are medians of the per-round ratios
(paired: a stretch of load from other jobs slows a whole round, not one side of a ratio).

The overhead on a whole training step is measured by `scripts/benchmark_preconditioner_step.py`.

Writes the table into docs/benchmarks.md (section `preconditioner_speed`, or
`preconditioner_speed_gpu` with `--device cuda`) unless `--no-write`.

    python scripts/benchmark_preconditioner.py [--ranks 16 64] [--repeats 15] [--threads 2]
        [--device cuda --dtype bfloat16] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft.optimizers.riemannian import _RiemannianPreconditioner  # noqa: E402
from speed_floor import FloorProbes, clock, floor_estimate, floor_probes, synchronizer  # noqa: E402
from torch import nn  # noqa: E402

from modules.lora.layers import LoRALinear  # noqa: E402
from modules.lora.preconditioning.preconditioner import (  # noqa: E402
    LoRAPair,
    LoRAPreconditioner,
    PreconditionerSettings,
)
from modules.util.dtypes import DTYPES  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

PEFT_REG = 1e-2  # PEFT's default damping
CROSS_ATTENTION_DIM = 2048  # SDXL's concatenated text-encoder width
EAGER = "ours, Riemannian, no CUDA graph"
BUSY, BEHIND = "GPU busy", "ours, Riemannian, behind GPU work"
BUSY_COPIES = 10  # of the 256 MiB copy probe: about 2 ms of other work on an H100

# (inner dim, Transformer2DModels, transformer blocks in each) of the SDXL base UNet's attention
# blocks: down_blocks.1, down_blocks.2, mid_block, up_blocks.0, up_blocks.1 (down_blocks.0 and
# up_blocks.2 have no attention)
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


# -- the pass -------------------------------------------------------------------------------


@dataclass
class FactorSet:
    pairs: list[LoRAPair]
    riemannian: LoRAPreconditioner
    adaprelora: LoRAPreconditioner
    riemannian_eager: LoRAPreconditioner | None  # on a GPU: the same without the CUDA graph
    elements: int  # A and B entries together
    flops: float  # 4 r^2 (m + n) summed over the layers


def build_factor_set(rank: int, *, dtype: torch.dtype, device: torch.device) -> FactorSet:
    generator = torch.Generator(device=device).manual_seed(rank)

    def random(*shape: int, std: float) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
        return (values * std).to(dtype)

    pairs, elements, flops = [], 0, 0.0
    for out_features, in_features in sdxl_linear_shapes():
        a = nn.Parameter(random(rank, in_features, std=in_features**-0.5))
        b = nn.Parameter(random(out_features, rank, std=0.02))
        a.grad = random(rank, in_features, std=1e-3)
        b.grad = random(out_features, rank, std=1e-3)
        with torch.device("meta"):  # the layer AdaPreLoRA's statistics attach to; never run
            base = nn.Linear(in_features, out_features, bias=False)
            stand_in = LoRALinear(base=base, name="layer", rank=rank, alpha=rank)
        pairs.append(LoRAPair(a=a, b=b, scale=1.0, adapter=stand_in))
        elements += a.numel() + b.numel()
        flops += 4 * rank**2 * (out_features + in_features)
    # both preconditioners pack the same Parameters, each into its own stacks: before each timed
    # pass an untimed refresh() moves them into the stacks of the method about to run
    riemannian = LoRAPreconditioner(pairs, PreconditionerSettings(method="riemannian"))
    adaprelora = LoRAPreconditioner(pairs, PreconditionerSettings(method="adaprelora"))
    eager = None
    if device.type == "cuda":
        eager = LoRAPreconditioner(pairs, PreconditionerSettings(cuda_graph=False))
    for rows, cols in adaprelora.statistics.sketches:
        rows.copy_(torch.randn(rows.shape, generator=generator, device=device))
        cols.copy_(torch.randn(cols.shape, generator=generator, device=device))
    return FactorSet(pairs, riemannian, adaprelora, eager, elements, flops)


def time_pass(
    factors: FactorSet, probes: FloorProbes, *, device: torch.device, repeats: int
) -> dict[str, list[float]]:
    sync = synchronizer(device)
    groups = factors.riemannian.groups
    params = [p for pair in factors.pairs for p in (pair.a, pair.b)]
    peft = _RiemannianPreconditioner([(pair.a, pair.b) for pair in factors.pairs], reg=PEFT_REG)
    adamw = torch.optim.AdamW(params, lr=1e-6, foreach=True)

    # the gradients every pass starts from, in our stacks' layout
    factors.riemannian.precondition()
    saved = [(group.grad_a.clone(), group.grad_b.clone()) for group in groups]

    def settle(preconditioner: LoRAPreconditioner) -> Callable[[], None]:
        """Untimed: move the parameters into this preconditioner's stacks, reset the gradients."""

        def prepare() -> None:
            for group, (grad_a, grad_b) in zip(preconditioner.groups, saved, strict=True):
                group.refresh()  # both pack in first-seen order, so `saved` lines up
                group.grad_a.copy_(grad_a)
                group.grad_b.copy_(grad_b)
            sync()

        return prepare

    methods: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
        "ours, Riemannian": (settle(factors.riemannian), factors.riemannian.precondition),
        "ours, AdaPreLoRA": (settle(factors.adaprelora), factors.adaprelora.precondition),
        "PEFT": (settle(factors.riemannian), peft.step),
        "AdamW (foreach)": (settle(factors.riemannian), adamw.step),
        **{name: (sync, op) for name, op in probes.ops.items()},
    }
    if factors.riemannian_eager is not None:
        eager = factors.riemannian_eager
        methods[EAGER] = (settle(eager), eager.precondition)
        copy = probes.ops["copy"]

        def busy() -> None:  # queued GPU work: a hook called before the GPU has caught up
            for _ in range(BUSY_COPIES):
                copy()

        def behind_busy() -> None:
            busy()
            factors.riemannian.precondition()

        methods[BUSY] = (sync, busy)
        methods[BEHIND] = (settle(factors.riemannian), behind_busy)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for prepare, run in methods.values():  # warm-up, also initialises AdamW's state
        prepare()
        run()
    for repeat in range(repeats):
        order = list(methods)
        order = order[repeat % len(order) :] + order[: repeat % len(order)]
        for name in order:
            prepare, run = methods[name]
            prepare()
            times[name].append(clock(run, sync))
    settle(factors.riemannian)()
    return times


def pass_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for rank in args.ranks:
        factors = build_factor_set(rank, dtype=dtype, device=device)
        probes = floor_probes(rank, device)
        times = time_pass(factors, probes, device=device, repeats=args.repeats)
        median = {name: statistics.median(values) for name, values in times.items()}
        best = {name: min(values) for name, values in times.items()}
        itemsize = torch.finfo(dtype).bits // 8
        traffic = 3 * factors.elements * itemsize
        bandwidth, throughput, memory_floor, matmul_floor = floor_estimate(
            median, probes, traffic=traffic, flops=factors.flops
        )
        floor = max(memory_floor, matmul_floor)
        best_floor = max(floor_estimate(best, probes, traffic=traffic, flops=factors.flops)[2:])
        # paired: each round times every method and probe once, so a round's ratios share the
        # machine's load of that moment; the medians of those ratios are what the targets read
        rounds = [{name: values[i] for name, values in times.items()} for i in range(args.repeats)]
        round_floors = [
            max(floor_estimate(one, probes, traffic=traffic, flops=factors.flops)[2:])
            for one in rounds
        ]
        paired_peft = statistics.median([one["ours, Riemannian"] / one["PEFT"] for one in rounds])
        paired_floor = statistics.median(
            [
                one["ours, Riemannian"] / one_floor
                for one, one_floor in zip(rounds, round_floors, strict=True)
            ]
        )
        added = None
        if BEHIND in times:  # what the pass adds to a GPU that is busy when it is called
            added = statistics.median([one[BEHIND] - one[BUSY] for one in rounds])
        row = {
            "added": added,
            "rank": rank,
            "params": factors.elements,
            **median,
            "memory floor": memory_floor,
            "matmul floor": matmul_floor,
            "floor": floor,
            "ours/PEFT": paired_peft,
            "ours/floor": paired_floor,
            "best": {
                "ours": best["ours, Riemannian"],
                "PEFT": best["PEFT"],
                "floor": best_floor,
            },
            "bandwidth": bandwidth,
            "throughput": throughput,
        }
        rows.append(row)
        print(
            f"rank {rank}: "
            + ", ".join(
                f"{name} {value * 1e3:.1f} ms (min {min(times[name]) * 1e3:.1f})"
                for name, value in median.items()
            )
            + f"; floor {floor * 1e3:.1f} ms (memory {memory_floor * 1e3:.1f} ms at "
            f"{bandwidth / 1e9:.1f} GB/s, matmul {matmul_floor * 1e3:.1f} ms at "
            + "/".join(f"{value / 1e9:.0f}" for value in throughput.values())
            + f" GFLOP/s Gram/product); ours/PEFT {paired_peft:.2f}, ours/floor "
            f"{paired_floor:.2f} (medians of per-round ratios); ours, each round: "
            + ", ".join(f"{seconds * 1e3:.2f}" for seconds in times["ours, Riemannian"])
            + " ms",
            flush=True,
        )
        del factors, probes
    return rows


def target_checks(rows: list[dict], device: torch.device, dtype: torch.dtype) -> list[str]:
    """The issue's targets for the Riemannian pass, each with the measured figure."""
    checks = []
    for row in rows:
        rank, ours = row["rank"], row["ours, Riemannian"]
        if device.type == "cpu" and dtype == torch.float32:
            limit = {16: 0.4, 64: 0.6}.get(rank)
            if limit is not None:
                checks.append((f"rank {rank}: ours/PEFT <= {limit}", row["ours/PEFT"] <= limit))
            checks.append((f"rank {rank}: ours/floor <= 2", row["ours/floor"] <= 2))
        elif device.type == "cuda" and rank == 16:
            checks.append((f"rank {rank}: ours/PEFT <= 0.1", row["ours/PEFT"] <= 0.1))
            checks.append((f"rank {rank}: ours < 2 ms ({ours * 1e3:.2f} ms)", ours < 2e-3))
    return [f"{text}: {'met' if met else 'NOT met'}" for text, met in checks]


def pass_table(rows: list[dict], *, device: torch.device, dtype: torch.dtype, repeats: int) -> str:
    ms = lambda seconds: f"{seconds * 1e3:.1f}"  # noqa: E731
    lines = [
        f"Pass over the 722 attention/MLP Linear LoRA layers of the SDXL UNet, "
        f"{str(dtype).removeprefix('torch.')} "
        f"weights and gradients (float32 Grams and solves), median of {repeats} passes (ms). "
        "Every round times each method and floor probe once; ours/PEFT and ours/floor are "
        "medians of the per-round ratios (paired, so load from other jobs that changes between "
        "rounds cancels).",
        "",
        "| rank | LoRA params | ours, Riemannian | ours, AdaPreLoRA | PEFT | AdamW (foreach) "
        "| floor (memory / matmul) | ours/PEFT | ours/floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['rank']} | {row['params'] / 1e6:.1f} M | {ms(row['ours, Riemannian'])} "
            f"| {ms(row['ours, AdaPreLoRA'])} | {ms(row['PEFT'])} | {ms(row['AdamW (foreach)'])} "
            f"| {ms(row['floor'])} ({ms(row['memory floor'])} / {ms(row['matmul floor'])}) "
            f"| {row['ours/PEFT']:.2f} | {row['ours/floor']:.2f} |"
        )
    measured = "; ".join(
        f"rank {row['rank']}: copy {row['bandwidth'] / 1e9:.1f} GB/s, bmm "
        + "/".join(f"{value / 1e9:.0f}" for value in row["throughput"].values())
        + " GFLOP/s (Gram-shaped/product-shaped)"
        for row in rows
    )
    lines += [
        "",
        f"Floor inputs measured in the same run: {measured}. Memory floor: A, B, g_A, g_B read "
        "once and g_A, g_B written once at the copy bandwidth; matmul floor: "
        "4 r^2 (m + n) flops per layer at the faster of the two bmm throughputs.",
    ]
    lines += [
        "",
        "The same from each method's fastest pass (less sensitive to other jobs on the machine): "
        + "; ".join(
            f"rank {row['rank']}: ours {ms(row['best']['ours'])}, PEFT {ms(row['best']['PEFT'])}, "
            f"floor {ms(row['best']['floor'])}, ours/PEFT "
            f"{row['best']['ours'] / row['best']['PEFT']:.2f}, ours/floor "
            f"{row['best']['ours'] / row['best']['floor']:.2f}"
            for row in rows
        )
        + ".",
    ]
    if EAGER in rows[0]:
        lines += [
            "",
            "On a GPU our Riemannian pass is recorded as a CUDA graph at its first step and "
            "replayed after that (`modules/lora/preconditioning/graphed_pass.py`); the same pass "
            "launched kernel by kernel from Python, as on the CPU: "
            + "; ".join(
                f"rank {row['rank']}: {ms(row[EAGER])} ms, {row[EAGER] / row['ours, Riemannian']:.1f}x "
                "the graphed pass"
                for row in rows
            )
            + ". The table times each pass from an idle GPU to the end of its work, as the "
            "hook runs in our trainer (whose step reads the loss and the gradient norm, one host "
            "sync, before the optimizer step), so the host's share (checking 1444 parameters' "
            "pointers, launching the graph) and the GPU's add up. Called while the GPU is still "
            f"busy, queued behind {BUSY_COPIES} copies of 256 MiB (about "
            f"{ms(rows[0][BUSY])} ms of GPU work), the host's share hides and the pass added "
            + "; ".join(f"rank {row['rank']}: {row['added'] * 1e3:.2f} ms" for row in rows)
            + " (medians of the per-round differences to the copies alone).",
        ]
    checks = target_checks(rows, device, dtype)
    if checks:
        lines += [
            "",
            "Targets for the Riemannian pass (paired medians): " + "; ".join(checks) + ".",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    on_gpu = device.type == "cuda"
    sections = [
        f"## LoRA gradient preconditioner speed{' on a GPU' if on_gpu else ''} "
        "(`scripts/benchmark_preconditioner.py`)",
        "",
        benchmark_header("scripts/benchmark_preconditioner.py", device),  # load before the run
    ]
    rows = pass_rows(args, device, dtype)
    sections += ["", pass_table(rows, device=device, dtype=dtype, repeats=args.repeats)]
    text = "\n".join(sections)
    section = "preconditioner_speed_gpu" if on_gpu else "preconditioner_speed"
    report_benchmark(text, section=section, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
