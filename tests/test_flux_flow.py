"""Flux's flow matching: packing and ids as FluxPipeline's, noise levels as drawn and shifted, and
the training loss against a float64 reference built from diffusers' own pipeline helpers."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from modules.config.loading import load_config
from modules.models.base import Batch
from modules.models.flux.config import FluxModelConfig
from modules.models.flux.flow import (
    image_ids,
    pack_latents,
    resolution_shift,
    sample_sigmas,
    shift_sigmas,
    text_ids,
    unpack_latents,
)
from modules.models.flux.tiny import scheduler_for
from modules.models.registry import get_family

SIZES = [(2, 16, 8, 8), (1, 16, 4, 12), (3, 4, 10, 6)]  # (batch, channels, height, width)


@pytest.mark.parametrize("shape", SIZES)
def test_packing_matches_flux_pipeline(shape: tuple[int, int, int, int]) -> None:
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _, _, height, width = shape
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, *shape))
    # FluxPipeline unpacks from pixel sizes; a VAE factor of 8 maps latents 2x2 to 16x16 px
    theirs = FluxPipeline._unpack_latents(packed, 8 * height, 8 * width, 8)
    ours = unpack_latents(packed, height=height, width=width)
    assert torch.equal(ours, theirs) and torch.equal(ours, latents)


@pytest.mark.parametrize(("height", "width"), [(8, 8), (4, 12), (128, 96)])
def test_ids_match_flux_pipeline(height: int, width: int, tiny_flux_path: Path) -> None:
    expected = FluxPipeline._prepare_latent_image_ids(
        1, height // 2, width // 2, "cpu", torch.float32
    )
    assert torch.equal(image_ids(height, width), expected)
    if (height, width) == (8, 8):
        pipe = FluxPipeline.from_pretrained(tiny_flux_path)
        _, _, ids = pipe.encode_prompt("a red circle", prompt_2=None, max_sequence_length=16)
        assert torch.equal(text_ids(16), ids)


def test_resolution_shift_is_the_schedulers(tiny_flux_path: Path) -> None:
    """Shifting by exp(mu) is what FlowMatchEulerDiscreteScheduler does to [dev]'s sigmas."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_flux_path, subfolder="scheduler"
    )
    sigmas = torch.linspace(1.0, 0.05, 12)
    for tokens in (64, 256, 1024, 4096):  # 1024 px is 64x64 packed tokens
        config = scheduler.config
        mu = calculate_shift(
            tokens,
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )
        scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
        ours = shift_sigmas(sigmas, resolution_shift(tokens, config))
        torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-6)
    assert resolution_shift(4096, scheduler.config) == pytest.approx(math.exp(1.15))
    assert resolution_shift(256, scheduler.config) == pytest.approx(math.exp(0.5))
    schnell = scheduler_for(guidance_embeds=False).config  # samples unshifted
    assert resolution_shift(4096, schnell) == 1.0


def _sigmas(**settings) -> torch.Tensor:
    config = FluxModelConfig(**settings)
    return sample_sigmas(
        config,
        batch_size=40_000,
        image_tokens=4096,
        scheduler_config={"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
        generator=torch.Generator().manual_seed(0),
    )


def test_timestep_distributions() -> None:
    uniform = _sigmas(timestep_sampling="uniform", timestep_shift="none")
    assert uniform.min() >= 0 and uniform.max() < 1
    deciles = torch.quantile(uniform, torch.linspace(0.1, 0.9, 9))
    torch.testing.assert_close(deciles, torch.linspace(0.1, 0.9, 9), atol=0.01, rtol=0)

    logit = torch.logit(_sigmas(logit_mean=-0.5, logit_std=1.5, timestep_shift="none").double())
    assert logit.mean().item() == pytest.approx(-0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(1.5, abs=0.03)

    # a shift is monotone: it maps the median of the drawn levels to its shifted value
    fixed = _sigmas(timestep_sampling="uniform", timestep_shift="fixed", shift=3.0)
    assert fixed.median().item() == pytest.approx(0.75, abs=0.01)  # 3 * 0.5 / (1 + 2 * 0.5)
    by_resolution = _sigmas(timestep_shift="resolution")  # logit-normal, 1024 px: s = e^1.15
    assert by_resolution.median().item() == pytest.approx(
        shift_sigmas(torch.tensor(0.5), math.exp(1.15)).item(), abs=0.01
    )


def _reference_loss(base, batch: Batch, *, seed: int, settings: FluxModelConfig) -> torch.Tensor:
    """The loss in float64 from diffusers' FluxPipeline helpers and the same random draws."""
    generator = torch.Generator().manual_seed(seed)
    transformer = copy.deepcopy(base.transformer).double()
    vae = base.vae
    with torch.no_grad():
        dist = vae.encode(batch.pixels.float()).latent_dist
        mean, std = dist.mean.double(), dist.std.double()
        eps = torch.randn(mean.shape, generator=generator).double()
        latents = (mean + std * eps - vae.config.shift_factor) * vae.config.scaling_factor
        size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).double()
        u = compute_density_for_timestep_sampling(
            weighting_scheme=settings.timestep_sampling,
            batch_size=size,
            logit_mean=settings.logit_mean,
            logit_std=settings.logit_std,
            generator=generator,
        ).double()
        shift = {
            "none": 1.0,
            "fixed": settings.shift,
            # checked against the scheduler above
            "resolution": resolution_shift(
                (height // 2) * (width // 2), base.noise_scheduler.config
            ),
        }[settings.timestep_shift]
        sigmas = shift * u / (1 + (shift - 1) * u)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - s) * latents + s * noise, *latents.shape)
        ids = FluxPipeline._prepare_latent_image_ids(
            size, height // 2, width // 2, "cpu", torch.float64
        )
        prompt_embeds, pooled = batch.text["prompt_embeds"].double(), batch.text["pooled"].double()
        guidance = torch.full((size,), settings.guidance, dtype=torch.float64)
        prediction = transformer(
            hidden_states=noisy,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=ids,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, dtype=torch.float64),
            guidance=guidance if transformer.config.guidance_embeds else None,
            return_dict=False,
        )[0]
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        prediction = FluxPipeline._unpack_latents(
            prediction, factor * height, factor * width, factor
        )
        per_image = ((prediction - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
        weights = compute_loss_weighting_for_sd3(settings.loss_weighting, sigmas)
        return (per_image * weights).mean()


@pytest.mark.parametrize(
    "settings",
    [
        {},  # logit-normal, shifted by resolution, unweighted
        {"timestep_sampling": "uniform", "timestep_shift": "fixed", "shift": 3.0},
        {"timestep_shift": "none", "loss_weighting": "sigma_sqrt", "guidance": 3.5},
        {"logit_mean": 0.5, "logit_std": 0.7, "timestep_shift": "none", "loss_weighting": "cosmap"},
    ],
    ids=["default", "uniform-fixed-shift", "sigma-sqrt", "cosmap"],
)
def test_training_loss_matches_a_float64_reference(
    settings: dict, tiny_flux_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    from tests.conftest import FAMILY_SETTINGS
    from tests.helpers import TinyModel

    model = TinyModel("flux", tiny_flux_path, {**FAMILY_SETTINGS["flux"], **settings})
    config = load_config(raw=model.config(tiny_dataset_path, tmp_path))
    family = get_family("flux")
    base = family.load(config)
    base.eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = ["a red circle", "a blue square"]
    batch = Batch(
        captions=captions,
        original_sizes=torch.tensor([[64, 64]] * 2),
        crop_top_lefts=torch.zeros(2, 2, dtype=torch.long),
        target_size=(64, 64),
        pixels=pixels,
        text=family.encode_text(base, captions),
    )
    with torch.no_grad():
        ours = family.training_loss(
            base, batch, generator=torch.Generator().manual_seed(11), config=config
        )
    reference = _reference_loss(base, batch, seed=11, settings=config.model)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) / reference.item() < 1e-5
