"""Sample images with the LoRA applied, without touching the training RNG streams."""

from __future__ import annotations

from pathlib import Path

import torch

from modules.config.schema import SamplingConfig
from modules.models.base import ModelFamily
from modules.util.atomic import atomic_write


def write_samples(
    *,
    family: ModelFamily,
    base: torch.nn.Module,
    config: SamplingConfig,
    resolution: int,
    folder: Path,
) -> list[Path]:
    """Render every prompt with a fixed seed into `folder`; returns the image paths."""
    if not config.prompts:
        return []
    pipe = family.sampling_pipeline(base)
    device = pipe.device
    was_training = base.training
    written = []
    devices = [device] if device.type == "cuda" else []
    # fork_rng: dropout and anything else drawing from the global stream stay as they were,
    # so a run that samples resumes exactly like one that does not.
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        base.eval()
        try:
            for index, prompt in enumerate(config.prompts):
                generator = torch.Generator("cpu").manual_seed(config.seed + index)
                image = pipe(
                    prompt=prompt,
                    negative_prompt=config.negative_prompt or None,
                    num_inference_steps=config.steps,
                    guidance_scale=config.cfg_scale,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                ).images[0]
                path = folder / f"{index:02d}.png"
                # atomic: a full disk is one line naming the image, not PIL's raw error
                atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                written.append(path)
        finally:
            base.train(was_training)
    return written
