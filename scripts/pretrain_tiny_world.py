"""Pretrain the tiny world's base model from scratch, into resources/tiny-world-<family>.

`--family sdxl` (the default) makes the SDXL-shaped model (resources/tiny-world-sdxl), `--family
flux` the Flux.1 [dev]-shaped one (resources/tiny-world-flux); the architectures are
`modules/models/<family>/tiny_world.py`, what differs in training is scripts/tiny_world_recipes.py.

Stages, each checkpointed under --work (rerun the same command to resume a killed run; a finished
stage is skipped), scripts/tiny_world_stages.py:
  1. the VAE, on freshly drawn tiny-world images (MSE plus a small KL term);
  2. a fixed set of images encoded once (latent mean and std), and the latents' normalisation
     (scaling factor, and for Flux the shift);
  3. the denoiser and the text encoders together, with the family's own `training_loss` (SDXL:
     epsilon, min-SNR 5, 10% of captions dropped so classifier-free guidance works; Flux: flow
     matching, no caption dropout as [dev] samples without it); an EMA of the weights is exported;
  4. export: the EMA weights as the family's diffusers folder (safetensors only), loaded back
     through the family's loader to draw a sheet of samples (docs/images/).

Seeds fix every image, caption, noise draw and the initialisation. Pretraining takes a while on
a CPU; docs/benchmarks.md records the commands that made the models in resources/ and their
times. Run it niced when the machine is shared:

    nice -n 19 python scripts/pretrain_tiny_world.py --threads 2
    nice -n 19 python scripts/pretrain_tiny_world.py --family flux --threads 1

Give it as many threads as cores it gets to itself: torch's threads wait for each other at every
operation, so two threads on cores that other work keeps taking are many times slower than one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402
from scripts.tiny_world_recipes import RECIPES  # noqa: E402
from scripts.tiny_world_stages import (  # noqa: E402
    StageClock,
    encode_images,
    export,
    load_average,
    log,
    sample_sheet,
    train_denoiser,
    train_vae,
)


def _shown(path: Path) -> Path:
    """`path` relative to the repository when it is inside it (as the docs name it)."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(RECIPES), default="sdxl")
    parser.add_argument("--out", help="the model folder (default resources/tiny-world-<family>)")
    parser.add_argument("--work", help="checkpoints (default workspace/pretrain-tiny-world...)")
    parser.add_argument("--sheet", help="the sample sheet PNG (default in docs/images/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: the cores it has to itself (see above)",
    )
    family_default = "(default: the family's, scripts/tiny_world_recipes.py)"
    parser.add_argument("--vae-steps", type=int, help=family_default)
    parser.add_argument(
        "--vae-crop-steps", type=int, help=f"first VAE steps on 32 px crops {family_default}"
    )
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--images", type=int, help=f"denoiser training images {family_default}")
    parser.add_argument("--unet-steps", type=int, help=f"denoiser steps {family_default}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, help=family_default)
    parser.add_argument("--caption-dropout", type=float, help=family_default)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--sheet-every", type=int, default=500)
    parser.add_argument(
        "--no-docs",
        dest="write_docs",
        action="store_false",
        help="do not record the run's time in docs/benchmarks.md",
    )
    args = parser.parse_args()
    recipe = RECIPES[args.family]
    for key, value in recipe.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    suffix = "" if args.family == "sdxl" else f"-{args.family}"
    args.out = args.out or str(REPO / "resources" / recipe.model)
    args.work = args.work or str(REPO / "workspace" / f"pretrain-tiny-world{suffix}")
    args.sheet = args.sheet or str(REPO / "docs" / "images" / recipe.sheet)
    return args


def main() -> int:
    args = parse_args()
    recipe = RECIPES[args.family]()
    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    header = benchmark_header("scripts/pretrain_tiny_world.py")
    log(f"pretraining with {torch.get_num_threads()} torch threads: {vars(args)}")
    vae = train_vae(args, work, recipe)
    latents = encode_images(args, work, vae, recipe)
    base = train_denoiser(args, work, recipe, vae, latents)
    export(recipe, base, out)
    loaded = recipe.family.load(recipe.load_config(out))
    sheet = sample_sheet(recipe, loaded, Path(args.sheet))
    timing = StageClock(work, "total").read()
    stages = ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in timing.items())
    log(f"samples of the exported model: {sheet}; stages: {stages}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report_benchmark(
        f"## {recipe.title}\n\n"
        f"![samples of the pretrained tiny world model](images/{Path(args.sheet).name})\n\n"
        f"{header} Wall-clock time by stage, summed over resumed runs: {stages} (total "
        f"{sum(timing.values()) / 3600:.1f} h; load average {load_average()} at the end). The "
        f"model: {size / 2**20:.1f} MiB of safetensors in `{_shown(out)}`.",
        section=recipe.section,
        write=args.write_docs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
