"""Sample images with the LoRA applied, without touching the training RNG streams."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from modules.config.schema import SamplingConfig
from modules.lora.network import LoRANetwork
from modules.models.base import ModelFamily
from modules.util.atomic import atomic_path, atomic_write


def render_prompts(
    *, family: ModelFamily, base: torch.nn.Module, config: SamplingConfig, resolution: int
) -> list[Image.Image]:
    """Every prompt rendered with its fixed seed (`sampling.seed` + its index)."""
    if not config.prompts:
        return []
    pipe = family.sampling_pipeline(base)
    device = pipe.device
    was_training = base.training
    images = []
    devices = [device] if device.type == "cuda" else []
    # fork_rng: dropout and anything else drawing from the global stream stay as they were,
    # so a run that samples resumes exactly like one that does not.
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        base.eval()
        try:
            for index, prompt in enumerate(config.prompts):
                generator = torch.Generator("cpu").manual_seed(config.seed + index)
                images.append(
                    pipe(
                        prompt=prompt,
                        negative_prompt=config.negative_prompt or None,
                        num_inference_steps=config.steps,
                        guidance_scale=config.cfg_scale,
                        height=resolution,
                        width=resolution,
                        generator=generator,
                    ).images[0]
                )
        finally:
            base.train(was_training)
    return images


def write_samples(
    *,
    family: ModelFamily,
    base: torch.nn.Module,
    config: SamplingConfig,
    resolution: int,
    folder: Path,
) -> list[Path]:
    """Render every prompt with a fixed seed into `folder`; returns the image paths."""
    images = render_prompts(family=family, base=base, config=config, resolution=resolution)
    written = []
    for index, image in enumerate(images):
        path = folder / f"{index:02d}.png"
        # atomic: a full disk is one line naming the image, not PIL's raw error
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        written.append(path)
    return written


def write_comparison(
    *,
    family: ModelFamily,
    base: torch.nn.Module,
    network: LoRANetwork,
    config: SamplingConfig,
    resolution: int,
    path: Path,
) -> Path | None:
    """The prompts rendered with the LoRA off (top row) and on (bottom row), same seeds, as one
    PNG; None without prompts."""
    network.detach()
    try:
        before = render_prompts(family=family, base=base, config=config, resolution=resolution)
    finally:
        network.attach()
    after = render_prompts(family=family, base=base, config=config, resolution=resolution)
    if not before:
        return None
    with atomic_path(path) as tmp:
        comparison_grid([("LoRA off", before), ("LoRA on", after)]).save(tmp, format="PNG")
    return path


def comparison_grid(rows: list[tuple[str, list[Image.Image]]], *, gap: int = 4) -> Image.Image:
    """Labelled rows of equally sized images on a white sheet."""
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(draw_probe.textlength(label)) for label, _ in rows) + 2 * gap
    width, height = rows[0][1][0].size
    columns = max(len(images) for _, images in rows)
    sheet = Image.new(
        "RGB",
        (label_width + columns * (width + gap) + gap, len(rows) * (height + gap) + gap),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        top = gap + row * (height + gap)
        _, text_top, _, text_bottom = draw.textbbox((0, 0), label)
        draw.text((gap, top + (height - text_bottom - text_top) // 2), label, fill="black")
        for column, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (label_width + column * (width + gap) + gap, top))
    return sheet
