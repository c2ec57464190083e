"""Flux.1's flow-matching pieces: latent packing, position ids and noise levels.

diffusers keeps packing and ids as private helpers of FluxPipeline, so they are written here
(tests compare them with FluxPipeline's); the timestep density, the SD3 loss weighting and the
resolution-dependent shift are diffusers' own public functions.
"""

from __future__ import annotations

import math

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling

from modules.models.flux.config import FluxModelConfig


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, row by row."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(
        batch, (height // 2) * (width // 2), channels * 4
    )


def unpack_latents(tokens: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def image_ids(height: int, width: int, *, device: torch.device | None = None) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids of the packed tokens: [0, row, column] per 2x2 patch."""
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(len(grid), 1, device=device), grid], dim=1)


def text_ids(length: int, *, device: torch.device | None = None) -> torch.Tensor:
    """(L, 3) position ids of the text tokens: all zero (text has no place in the image)."""
    return torch.zeros(length, 3, device=device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s sigma / (1 + (s - 1) sigma): s > 1 moves noise levels towards pure noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(image_tokens: int, scheduler_config: dict) -> float:
    """The shift the model's scheduler samples an image of this many packed tokens with.

    With dynamic shifting ([dev]) FlowMatchEulerDiscreteScheduler shifts by exp(mu), mu linear in
    the token count between the config's base and max shift; `shift_sigmas` with s = exp(mu) is
    that same map. Without it ([schnell]) the config's fixed `shift` applies (1: none).
    """
    if not scheduler_config.get("use_dynamic_shifting", False):
        return float(scheduler_config.get("shift", 1.0))
    mu = calculate_shift(
        image_tokens,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


def sample_sigmas(
    config: FluxModelConfig,
    *,
    batch_size: int,
    image_tokens: int,
    scheduler_config: dict,
    generator: torch.Generator,
) -> torch.Tensor:
    """Noise levels in (0, 1) for one batch: drawn by `timestep_sampling`, then shifted."""
    sigmas = compute_density_for_timestep_sampling(
        weighting_scheme=config.timestep_sampling,
        batch_size=batch_size,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        generator=generator,
    )
    if config.timestep_shift == "fixed":
        return shift_sigmas(sigmas, config.shift)
    if config.timestep_shift == "resolution":
        return shift_sigmas(sigmas, resolution_shift(image_tokens, scheduler_config))
    return sigmas
