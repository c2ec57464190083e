"""The stages of `pretrain_tiny_world.py`, the same for every family: the VAE, the encoded
training set, the denoiser (with the family's own `training_loss`, through a `WorldRecipe` from
`tiny_world_recipes.py`), the sample sheet. Each stage is checkpointed under the work folder and
skipped once finished; seeds fix every image, caption, noise draw and the initialisation."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from modules.data import tiny_world
from modules.util.atomic import atomic_path

SHEET_PROMPTS = [
    "a red circle",
    "a blue square on the left",
    "a large green triangle, on a white background",
    "a yellow diamond at the top, on a black background",
    "a small purple cross on the right",
    "a large orange circle at the bottom, on a gray background",
    "a small blue triangle in the center, on a white background",
    "a green square at the top",
]


def step_seed(seed: int, stage: int, step: int) -> int:
    return (seed * 1_000_003 + stage * 100_003 + step) % (2**63)


class Checkpoint:
    """One stage's resumable state: tensors and numbers only, loaded with weights_only=True."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def load_average() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class StageClock:
    """Wall-clock seconds each stage took, summed over resumed runs (work/timing.json)."""

    def __init__(self, work: Path, stage: str) -> None:
        self.path, self.stage = work / "timing.json", stage
        self.started = time.perf_counter()
        self.before = self.read().get(stage, 0.0)

    def read(self) -> dict[str, float]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self) -> None:
        timing = self.read()
        timing[self.stage] = self.before + time.perf_counter() - self.started
        self.path.write_text(json.dumps(timing, indent=2))


# -- stage 1: the VAE -------------------------------------------------------------------------------


def train_vae(args: argparse.Namespace, work: Path, recipe: Any) -> AutoencoderKL:
    done = work / "vae"
    if (done / "config.json").is_file():
        return AutoencoderKL.from_pretrained(done)
    torch.manual_seed(args.seed)
    clock = StageClock(work, "vae")
    vae = recipe.build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = get_scheduler(
        "cosine", optimizer, num_warmup_steps=100, num_training_steps=args.vae_steps
    )
    checkpoint = Checkpoint(work / "vae-checkpoint.pt")
    step = 0
    if (state := checkpoint.load()) is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        log(f"vae: resumed at step {step}")
    vae.train()
    started, recent = time.perf_counter(), []
    while step < args.vae_steps:
        scenes = tiny_world.random_scenes(args.vae_batch, seed=step_seed(args.seed, 1, step))
        pixels = tiny_world.render(scenes) * 2 - 1
        generator = torch.Generator().manual_seed(step_seed(args.seed, 11, step))
        if step < args.vae_crop_steps:  # a quarter of the pixels: the convolutions learn faster
            top, left = torch.randint(0, 33, (2,), generator=generator).tolist()
            pixels = pixels[:, :, top : top + 32, left : left + 32]
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(reconstruction, pixels)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + args.vae_kl * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent.append(mse.item())
        if step % 100 == 0 or step == args.vae_steps:
            rate = (time.perf_counter() - started) / len(recent)
            psnr = 10 * math.log10(4 / (sum(recent) / len(recent)))
            log(f"vae step {step}/{args.vae_steps}: PSNR {psnr:.1f} dB, {rate:.2f} s/step")
            started, recent = time.perf_counter(), []
        if step % args.checkpoint_every == 0 and step < args.vae_steps:
            checkpoint.save(
                {
                    "model": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step,
                }
            )
            clock.save()
    vae.eval()
    vae.save_pretrained(done)
    clock.save()
    checkpoint.path.unlink(missing_ok=True)
    return vae


# -- stage 2: latents -------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(args: argparse.Namespace, work: Path, vae: AutoencoderKL, recipe: Any) -> dict:
    """Latent means and stds of the training images, and the VAE's normalisation: a scaling
    factor that makes sampled latents unit-variance, and (`recipe.shift_latents`, Flux) a shift
    that centres them first."""
    path = work / "latents.safetensors"
    if path.is_file():
        return load_file(path)
    clock = StageClock(work, "encode")
    scenes = tiny_world.random_scenes(args.images, seed=step_seed(args.seed, 2, 0))
    means, stds = [], []
    for start in range(0, len(scenes), 256):
        pixels = tiny_world.render(scenes[start : start + 256]) * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator().manual_seed(args.seed)
    sampled = mean + std * torch.randn(mean.shape, generator=generator)
    latents = {"mean": mean.contiguous(), "std": std.contiguous()}
    if recipe.shift_latents:
        latents["shift_factor"] = sampled.mean().reshape(1)
        sampled = sampled - latents["shift_factor"]
    latents["scaling_factor"] = (1.0 / sampled.std()).reshape(1)
    with atomic_path(path) as tmp:
        save_file(latents, tmp)
    clock.save()
    log(f"encoded {len(scenes)} images; scaling factor {float(latents['scaling_factor']):.4f}")
    return latents


# -- stage 3: the denoiser and text encoders --------------------------------------------------------


def train_denoiser(
    args: argparse.Namespace, work: Path, recipe: Any, vae: AutoencoderKL, latents: dict
):
    """The recipe's trained modules together (AdamW, constant after warm-up, gradients clipped
    to 1), an EMA of their weights being what is returned. A fraction of captions (
    `args.caption_dropout`) is dropped to zero embeddings, for classifier-free guidance."""
    clock = StageClock(work, "denoiser")
    base = recipe.build_base(vae, latents)
    base.vae.requires_grad_(False)
    trained = recipe.trained_modules(base)
    params = [p for module in trained.values() for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    # constant after warm-up, the EMA doing the averaging: the first n steps of a longer run
    # are an n-step run, so a run can be stopped at any sheet and continued
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=200)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=2 / 3)
    checkpoint = Checkpoint(work / "denoiser-checkpoint.pt")
    step = 0
    if (state := checkpoint.load()) is not None:
        for key, module in trained.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
        log(f"denoiser: resumed at step {step}")
    scenes = tiny_world.random_scenes(args.images, seed=step_seed(args.seed, 2, 0))
    count = len(scenes)
    base.train()
    started, recent = time.perf_counter(), []
    while step < args.unet_steps:
        draw = torch.Generator().manual_seed(step_seed(args.seed, 3, step))
        index = torch.randint(0, count, (args.batch,), generator=draw)
        chosen = [scenes[i] for i in index.tolist()]
        captions = tiny_world.random_captions(chosen, seed=step_seed(args.seed, 4, step))
        keep = (torch.rand(args.batch, generator=draw) >= args.caption_dropout).float()
        loss = recipe.loss(
            base,
            captions=captions,
            keep=keep,
            latent_mean=latents["mean"][index],
            latent_std=latents["std"][index],
            generator=draw,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        step += 1
        recent.append(loss.item())
        if step % 100 == 0 or step == args.unet_steps:
            rate = (time.perf_counter() - started) / len(recent)
            log(
                f"denoiser step {step}/{args.unet_steps}: loss {sum(recent) / len(recent):.4f}, "
                f"{rate:.2f} s/step"
            )
            started, recent = time.perf_counter(), []
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            checkpoint.save(
                {
                    **{key: module.state_dict() for key, module in trained.items()},
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "ema": ema.state_dict(),
                    "step": step,
                }
            )
            clock.save()
        if args.sheet_every and step % args.sheet_every == 0 and step < args.unet_steps:
            ema.store(params)
            ema.copy_to(params)
            sample_sheet(recipe, base, work / f"sheet-{step:06d}.png")
            ema.restore(params)
            if step % args.checkpoint_every == 0:  # where a shorter run would have ended
                shutil.copyfile(checkpoint.path, work / f"denoiser-{step:06d}.pt")
    ema.copy_to(params)
    clock.save()
    return base


# -- stage 4: export and check ----------------------------------------------------------------------


def _as_tensor(image: Any) -> torch.Tensor:
    """A sampled image as (3, H, W) in [0, 1], from a tensor or a PIL image."""
    if isinstance(image, torch.Tensor):
        return image
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
        2, 0, 1
    )


@torch.no_grad()
def sample_sheet(recipe: Any, base: Any, path: Path, *, seeds: int = 4) -> Path:
    """SHEET_PROMPTS in rows, `seeds` seeds in columns, as one PNG."""
    pipe = recipe.family.sampling_pipeline(base)
    was_training = base.training
    base.eval()
    rows = []
    for prompt in SHEET_PROMPTS:
        images = pipe(
            prompt=[prompt] * seeds,
            height=tiny_world.IMAGE_SIZE,
            width=tiny_world.IMAGE_SIZE,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
            **recipe.sheet_sampling,
        ).images
        rows.append(torch.cat([_as_tensor(image) for image in images], dim=2))
    base.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny_world.to_pil(torch.cat(rows, dim=1)).save(path)
    return path


def export(recipe: Any, base: Any, out: Path) -> None:
    """The recipe's diffusers folder, written next to `out` and then moved in its place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe.save_parts(base, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB)")
