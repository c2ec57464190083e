"""Pretrain the tiny world's SDXL-shaped base model from scratch, into resources/tiny-world-sdxl.

Stages, each checkpointed under --work (rerun the same command to resume a killed run; a finished
stage is skipped):
  1. the VAE, on freshly drawn tiny-world images (MSE plus a small KL term);
  2. a fixed set of images encoded once (latent mean and std), and the latent scaling factor;
  3. the UNet and both text encoders together, with SDXL's training loss (the family's own
     `training_loss`, min-SNR 5); 10% of captions are dropped to zero embeddings, as SDXL was
     trained, so classifier-free guidance works; an EMA of the weights is what gets exported;
  4. export: the EMA weights as an SDXL diffusers folder (safetensors only), loaded back through
     `modules/models/sdxl/loading.py` to draw a sheet of samples (docs/images/tiny_world_base.png).

Seeds fix every image, caption, noise draw and the initialisation. Pretraining takes a while on
a CPU; docs/benchmarks.md records the command that made resources/tiny-world-sdxl (the defaults,
with two threads) and its time. Run it niced when the machine is shared:

    nice -n 19 python scripts/pretrain_tiny_world.py --threads 2

Give it as many threads as cores it gets to itself: torch's threads wait for each other at every
operation, so two threads on cores that other work keeps taking are many times slower than one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLPipeline  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from modules.config.schema import TrainConfig  # noqa: E402
from modules.data import tiny_world  # noqa: E402
from modules.models.base import Batch  # noqa: E402
from modules.models.sdxl import tiny_world as architecture  # noqa: E402
from modules.models.sdxl.family import SDXLBase, SDXLFamily  # noqa: E402
from modules.util.atomic import atomic_path  # noqa: E402
from modules.util.machine import benchmark_header  # noqa: E402
from modules.util.markdown_section import report_benchmark  # noqa: E402

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


def _step_seed(seed: int, stage: int, step: int) -> int:
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


def _load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def _log(message: str) -> None:
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


def train_vae(args: argparse.Namespace, work: Path) -> AutoencoderKL:
    done = work / "vae"
    if (done / "config.json").is_file():
        return AutoencoderKL.from_pretrained(done)
    torch.manual_seed(args.seed)
    clock = StageClock(work, "vae")
    vae = architecture.build_vae()
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
        _log(f"vae: resumed at step {step}")
    vae.train()
    started, recent = time.perf_counter(), []
    while step < args.vae_steps:
        scenes = tiny_world.random_scenes(args.vae_batch, seed=_step_seed(args.seed, 1, step))
        pixels = tiny_world.render(scenes) * 2 - 1
        generator = torch.Generator().manual_seed(_step_seed(args.seed, 11, step))
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
            _log(f"vae step {step}/{args.vae_steps}: PSNR {psnr:.1f} dB, {rate:.2f} s/step")
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
def encode_images(args: argparse.Namespace, work: Path, vae: AutoencoderKL) -> dict:
    path = work / "latents.safetensors"
    if path.is_file():
        return load_file(path)
    clock = StageClock(work, "encode")
    scenes = tiny_world.random_scenes(args.images, seed=_step_seed(args.seed, 2, 0))
    means, stds = [], []
    for start in range(0, len(scenes), 256):
        pixels = tiny_world.render(scenes[start : start + 256]) * 2 - 1
        posterior = vae.encode(pixels).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    generator = torch.Generator().manual_seed(args.seed)
    sampled = mean + std * torch.randn(mean.shape, generator=generator)
    scale = (1.0 / sampled.std()).reshape(1)
    latents = {"mean": mean.contiguous(), "std": std.contiguous(), "scaling_factor": scale}
    with atomic_path(path) as tmp:
        save_file(latents, tmp)
    clock.save()
    _log(f"encoded {len(scenes)} images; scaling factor {float(latents['scaling_factor']):.4f}")
    return latents


# -- stage 3: UNet and text encoders ----------------------------------------------------------------


def _pipeline(vae: AutoencoderKL, scaling_factor: float) -> StableDiffusionXLPipeline:
    torch.manual_seed(_step_seed(0, 3, 0))
    vae.register_to_config(scaling_factor=scaling_factor)
    tokenizer = architecture.world_tokenizer(tiny_world.CAPTION_WORDS)
    text_encoder, text_encoder_2 = architecture.build_text_encoders(tokenizer)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=architecture.build_unet(),
        scheduler=architecture.build_scheduler(),
    )


def _trained(base: SDXLBase) -> list[torch.nn.Parameter]:
    return [
        p
        for module in (base.unet, base.text_encoder, base.text_encoder_2)
        for p in module.parameters()
    ]


def train_denoiser(args: argparse.Namespace, work: Path, vae: AutoencoderKL, latents: dict):
    family = SDXLFamily()
    clock = StageClock(work, "denoiser")
    base = SDXLBase(_pipeline(vae, float(latents["scaling_factor"])), prediction_type="epsilon")
    base.vae.requires_grad_(False)
    params = _trained(base)
    for p in params:
        p.requires_grad_(True)
    # text encoders are not "trained" in the LoRA sense: the loss reads the embeddings this
    # script computes (with their graph, so the encoders learn), dropped ones zeroed
    config = TrainConfig.model_validate({"model": {"base_model": "-", "min_snr_gamma": 5.0}})
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    # constant after warm-up, the EMA doing the averaging: the first n steps of a longer run
    # are an n-step run, so a run can be stopped at any sheet and continued
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=200)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=2 / 3)
    checkpoint = Checkpoint(work / "denoiser-checkpoint.pt")
    step = 0
    if (state := checkpoint.load()) is not None:
        for module, key in ((base.unet, "unet"), (base.text_encoder, "te1")):
            module.load_state_dict(state[key])
        base.text_encoder_2.load_state_dict(state["te2"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
        _log(f"denoiser: resumed at step {step}")
    scenes = tiny_world.random_scenes(args.images, seed=_step_seed(args.seed, 2, 0))
    count = len(scenes)
    size = torch.tensor([[tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE]])
    base.train()
    started, recent = time.perf_counter(), []
    while step < args.unet_steps:
        draw = torch.Generator().manual_seed(_step_seed(args.seed, 3, step))
        index = torch.randint(0, count, (args.batch,), generator=draw)
        chosen = [scenes[i] for i in index.tolist()]
        captions = tiny_world.random_captions(chosen, seed=_step_seed(args.seed, 4, step))
        keep = (torch.rand(args.batch, generator=draw) >= args.caption_dropout).float()
        embeds, pooled = family.encode_prompts(base, captions, with_grad=True)
        batch = Batch(
            captions=captions,
            original_sizes=size.expand(args.batch, 2),
            crop_top_lefts=torch.zeros(args.batch, 2, dtype=torch.long),
            target_size=(tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE),
            latent_mean=latents["mean"][index],
            latent_std=latents["std"][index],
            text={"prompt_embeds": embeds * keep[:, None, None], "pooled": pooled * keep[:, None]},
        )
        loss = family.training_loss(base, batch, generator=draw, config=config)
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
            _log(
                f"denoiser step {step}/{args.unet_steps}: loss {sum(recent) / len(recent):.4f}, "
                f"{rate:.2f} s/step"
            )
            started, recent = time.perf_counter(), []
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            checkpoint.save(
                {
                    "unet": base.unet.state_dict(),
                    "te1": base.text_encoder.state_dict(),
                    "te2": base.text_encoder_2.state_dict(),
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
            sample_sheet(family, base, work / f"sheet-{step:06d}.png")
            ema.restore(params)
            if step % args.checkpoint_every == 0:  # where a shorter run would have ended
                shutil.copyfile(checkpoint.path, work / f"denoiser-{step:06d}.pt")
    ema.copy_to(params)
    clock.save()
    return base, family


# -- stage 4: export and check ----------------------------------------------------------------------


@torch.no_grad()
def sample_sheet(family: SDXLFamily, base: SDXLBase, path: Path, *, seeds: int = 4) -> Path:
    """SHEET_PROMPTS in rows, `seeds` seeds in columns, as one PNG."""
    pipe = family.sampling_pipeline(base)
    was_training = base.training
    base.eval()
    rows = []
    for prompt in SHEET_PROMPTS:
        images = pipe(
            prompt=[prompt] * seeds,
            num_inference_steps=25,
            guidance_scale=5.0,
            height=tiny_world.IMAGE_SIZE,
            width=tiny_world.IMAGE_SIZE,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
            output_type="pt",
        ).images
        rows.append(torch.cat(list(images), dim=2))
    base.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tiny_world.to_pil(torch.cat(rows, dim=1)).save(path)
    return path


def _shown(path: Path) -> Path:
    """`path` relative to the repository when it is inside it (as the docs name it)."""
    resolved = path.resolve()
    return resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved


def export(base: SDXLBase, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        getattr(base, name).save_pretrained(tmp / name)
    base.noise_scheduler.save_pretrained(tmp / "scheduler")
    architecture.write_model_index(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    _log(f"wrote {out} ({size / 2**20:.1f} MiB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "resources" / "tiny-world-sdxl"))
    parser.add_argument("--work", default=str(REPO / "workspace" / "pretrain-tiny-world"))
    parser.add_argument("--sheet", default=str(REPO / "docs" / "images" / "tiny_world_base.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads: the cores it has to itself (see above)",
    )
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument(
        "--vae-crop-steps", type=int, default=1600, help="first VAE steps on 32 px crops"
    )
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-kl", type=float, default=1e-6)
    parser.add_argument("--images", type=int, default=20000, help="denoiser training images")
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--sheet-every", type=int, default=500)
    parser.add_argument(
        "--no-docs",
        dest="write_docs",
        action="store_false",
        help="do not record the run's time in docs/benchmarks.md",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    header = benchmark_header("scripts/pretrain_tiny_world.py")
    _log(f"pretraining with {torch.get_num_threads()} torch threads: {vars(args)}")
    vae = train_vae(args, work)
    latents = encode_images(args, work, vae)
    base, family = train_denoiser(args, work, vae, latents)
    export(base, Path(args.out))
    from modules.config.schema import TrainConfig as Config

    loaded = family.load(Config.model_validate({"model": {"base_model": args.out}}))
    sheet = sample_sheet(family, loaded, Path(args.sheet))
    timing = StageClock(work, "total").read()
    stages = ", ".join(f"{stage} {seconds / 60:.1f} min" for stage, seconds in timing.items())
    _log(f"samples of the exported model: {sheet}; stages: {stages}")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    report_benchmark(
        "## Tiny world pretraining (`scripts/pretrain_tiny_world.py`)\n\n"
        "![samples of the pretrained tiny world model](images/tiny_world_base.png)\n\n"
        f"{header} Wall-clock time by stage, summed over resumed runs: {stages} (total "
        f"{sum(timing.values()) / 3600:.1f} h; load average {_load()} at the end). The model: "
        f"{size / 2**20:.1f} MiB of safetensors in `{_shown(Path(args.out))}`.",
        section="tiny-world-pretraining",
        write=args.write_docs,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
