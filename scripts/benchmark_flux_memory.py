"""Peak GPU memory and seconds per step of LoRA training at real Flux.1-dev and SDXL shapes
(random weights), next to the estimate Geodesic prints before training.

Flux.1-dev (19 double and 38 single blocks) with its transformer in bf16, int8, fp8 and nf4, and
nf4 with block offloading; SDXL base 1.0 in bf16. LoRA rank 16 on the `attn-mlp` layers, 1024 x
1024, batch 1, gradient checkpointing, bf16 autocast, AdamW; latents and text embeddings cached,
so the VAE and text encoders stay in CPU memory (as in a real run after caching). Targets: Flux
under 16 GiB with an 8-bit base, under 12 GiB with nf4, under 8 GiB with offloading; SDXL under
8 GiB.

The estimate comes from meta-device models and needs no GPU. On CUDA each setting also trains
a few steps on the GPU, measuring `torch.cuda.max_memory_allocated` and the time per step;
without CUDA those columns say "unmeasured". Writes docs/benchmarks.md (section `flux-memory`)
unless --no-write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from modules.config.loading import load_config
from modules.lora.network import LoRANetwork
from modules.models.registry import get_family
from modules.training.memory import MemoryEstimate, estimate_memory, weight_lines
from modules.util.library_notices import quiet_library_notices
from modules.util.machine import benchmark_header
from modules.util.markdown_section import report_benchmark

GIB = 2**30

# GiB each setting should stay under (issue 22)
TARGETS = {"flux 8-bit": 16, "flux nf4": 12, "flux offload": 8, "sdxl": 8}


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str  # the table's row
    family: str
    model: dict  # the config's `model` section
    target: str | None  # key of TARGETS


def settings(offload_blocks: int) -> list[Setting]:
    trained = {"train": True, "weight_dtype": "bfloat16"}
    frozen = {"train": False, "weight_dtype": "bfloat16"}
    flux = {"family": "flux", "transformer": trained, "text_encoder": frozen}
    flux["text_encoder_2"] = frozen
    sdxl = {"family": "sdxl", "unet": trained, "text_encoder": frozen, "text_encoder_2": frozen}
    return [
        Setting("Flux.1-dev, bf16", "flux", {**flux, "quantize_base": "none"}, None),
        Setting("Flux.1-dev, int8", "flux", {**flux, "quantize_base": "int8"}, "flux 8-bit"),
        Setting("Flux.1-dev, fp8", "flux", {**flux, "quantize_base": "fp8"}, "flux 8-bit"),
        Setting("Flux.1-dev, nf4", "flux", {**flux, "quantize_base": "nf4"}, "flux nf4"),
        Setting(
            f"Flux.1-dev, nf4, {offload_blocks} blocks offloaded",
            "flux",
            {**flux, "quantize_base": "nf4", "offload_blocks": offload_blocks},
            "flux offload",
        ),
        Setting("SDXL base 1.0, bf16", "sdxl", sdxl, "sdxl"),
    ]


def config_for(setting: Setting, *, resolution: int, batch: int):
    return load_config(
        raw={
            "model": {"base_model": "random weights", **setting.model},
            "lora": {"rank": 16, "alpha": 16, "layer_preset": "attn-mlp"},
            "optimizer": {"name": "adamw", "learning_rate": 1e-4},
            "training": {
                "batch_size": batch,
                "gradient_checkpointing": True,
                "mixed_precision": "bf16",
            },
            "data": {"resolution": resolution},
        }
    )


def meta_base(family: str) -> SimpleNamespace:
    """The model's modules at full size on the meta device (as `family.load` names them)."""
    return get_family(family).meta_model(load_config(raw={}), reference=True)


def estimates(rows: list[Setting], *, resolution: int, batch: int) -> dict[str, MemoryEstimate]:
    """The estimate of every setting; the activation trace runs once per model (quantizing or
    offloading the frozen weights does not change it)."""
    result: dict[str, MemoryEstimate] = {}
    traced: dict[str, MemoryEstimate] = {}
    bases = {family: meta_base(family) for family in {row.family for row in rows}}
    for row in rows:
        family = get_family(row.family)
        config = config_for(row, resolution=resolution, batch=batch)
        profile = family.memory_profile(bases[row.family], config)
        if row.family not in traced:
            traced[row.family] = estimate_memory(profile, config)
            result[row.name] = traced[row.family]
            continue
        weights = weight_lines(profile, config, device="cuda")
        result[row.name] = dataclasses.replace(traced[row.family], weights=weights)
    return result


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialize(inputs: dict, device: torch.device) -> dict:
    """Random tensors shaped as the profile's meta inputs (uniform in [0, 1): valid timesteps)."""
    real = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            real[key] = materialize(value, device)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            real[key] = torch.rand(value.shape, dtype=torch.bfloat16, device=device)
        elif isinstance(value, torch.Tensor):
            real[key] = torch.zeros(value.shape, dtype=value.dtype, device=device)
        else:
            real[key] = value
    return real


def measure(
    setting: Setting, *, resolution: int, batch: int, steps: int, warmup: int
) -> tuple[int, float]:
    """Peak allocated GPU memory over the training steps, and seconds per step after warm-up."""
    device = torch.device("cuda")
    family = get_family(setting.family)
    config = config_for(setting, resolution=resolution, batch=batch)
    base = meta_base(setting.family)
    profile = family.memory_profile(base, config)
    denoiser_group = next(g for g in profile.groups if g.role == "denoiser")
    with torch.device(device), default_dtype(torch.bfloat16):
        denoiser = type(denoiser_group.module).from_config(denoiser_group.module.config)
    denoiser.requires_grad_(False)
    setattr(base, denoiser_group.name, denoiser)
    if setting.family == "flux":  # the quantization and offloading FluxFamily.load applies
        from modules.models.flux.memory import apply_memory_settings

        apply_memory_settings(denoiser, config)
    network = LoRANetwork.inject(
        family.lora_targets(base, config), rank=16, alpha=16, dropout=0.0
    ).to(device)
    denoiser.enable_gradient_checkpointing()
    denoiser.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    inputs = materialize(denoiser_group.inputs(batch, resolution, resolution), device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = denoiser(**inputs, return_dict=False)[0]
        output.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    del denoiser, network, optimizer, inputs, base, profile
    gc.collect()
    torch.cuda.empty_cache()
    timed = times[warmup:] or times
    return peak, sum(timed) / len(timed)


def table(
    rows: list[Setting],
    estimated: dict[str, MemoryEstimate],
    measured: dict[str, tuple[int, float]],
) -> str:
    lines = [
        "| setting | frozen weights on the GPU | estimate | measured peak | estimate error "
        "| s/step | target | filling the caches (estimate) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = estimated[row.name]
        weights = sum(line.device_bytes for line in estimate.weights)
        if row.name in measured:
            peak, seconds = measured[row.name]
            shown = f"{peak / GIB:.2f} GiB"
            error = f"{(estimate.total - peak) / peak:+.0%}"
            speed = f"{seconds:.2f}"
            basis = peak
        else:
            shown, error, speed, basis = "unmeasured", "", "unmeasured", estimate.total
        target = "none"
        if row.target is not None:
            limit = TARGETS[row.target]
            verdict = "met" if basis < limit * GIB else "not met"
            source = "" if row.name in measured else " (by the estimate)"
            target = f"< {limit} GiB: {verdict}{source}"
        lines.append(
            f"| {row.name} | {weights / GIB:.2f} GiB | {estimate.total / GIB:.2f} GiB | {shown} "
            f"| {error} | {speed} | {target} | {estimate.caching / GIB:.2f} GiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="training steps per setting (GPU)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument(
        "--offload-blocks", type=int, default=38, help="as the low-memory preset offloads"
    )
    parser.add_argument("--models", nargs="+", choices=["flux", "sdxl"], default=["flux", "sdxl"])
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    args = parser.parse_args()
    quiet_library_notices()  # before diffusers imports torchao
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    header = benchmark_header("scripts/benchmark_flux_memory.py", device)
    rows = [row for row in settings(args.offload_blocks) if row.family in args.models]
    estimated = estimates(rows, resolution=args.resolution, batch=args.batch)
    measured = {}
    if device.type == "cuda":
        for row in rows:
            measured[row.name] = measure(
                row,
                resolution=args.resolution,
                batch=args.batch,
                steps=args.steps,
                warmup=args.warmup,
            )
            print(f"{row.name}: peak {measured[row.name][0] / GIB:.2f} GiB", flush=True)
    shown = next((row for row in rows if row.target == "flux offload"), rows[0])
    detail = estimated[shown.name]
    setting = (
        f"LoRA rank 16 (`attn-mlp`), {args.resolution} x {args.resolution}, batch {args.batch}, "
        "gradient checkpointing, bf16 autocast, AdamW; VAE and text encoders in CPU memory "
        "(cached latents and text embeddings)"
    )
    gpu_note = (
        f"Measured: peak `torch.cuda.max_memory_allocated` over {args.steps} steps, s/step "
        f"without the first {args.warmup}."
        if measured
        else "No GPU in this run: the measured columns are unmeasured, the estimates stand alone "
        "(the script measures them when run on CUDA)."
    )
    text = "\n\n".join(
        [
            "## Flux.1 and SDXL memory (`scripts/benchmark_flux_memory.py`)",
            header,
            f"Random weights at the real shapes; {setting}. {gpu_note}",
            table(rows, estimated, measured),
            "The last column is the estimate while the latent and text caches fill: the VAE and "
            "the text encoders alone on the GPU, before the model comes (the same for every "
            "setting of a model).",
            f"The estimate as printed before training, for {shown.name}:",
            "```\n" + "\n".join(detail.lines()) + "\n```",
        ]
    )
    report_benchmark(text, section="flux-memory", write=not args.no_write)


if __name__ == "__main__":
    main()
