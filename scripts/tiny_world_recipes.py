"""What `pretrain_tiny_world.py` does differently per family: the architecture it builds, the
modules it trains, the family's own training loss on a batch, how it samples and saves.

Each recipe's `defaults` are the script's defaults for that family, what made its model in
`resources/` (docs/benchmarks.md records the command and time).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, FluxPipeline, StableDiffusionXLPipeline
from torch import nn

from modules.config.schema import TrainConfig
from modules.data import tiny_world
from modules.models.base import Batch
from modules.models.flux import tiny_world as flux_world
from modules.models.flux.family import FluxBase, FluxFamily
from modules.models.sdxl import tiny_world as sdxl_world
from modules.models.sdxl.family import SDXLBase, SDXLFamily
from scripts.tiny_world_stages import step_seed

_SIZE = (tiny_world.IMAGE_SIZE, tiny_world.IMAGE_SIZE)


class SDXLWorld:
    """UNet and both CLIPs, SDXL's epsilon loss with min-SNR 5, sampled with guidance 5."""

    family = SDXLFamily()
    model = "tiny-world-sdxl"
    sheet = "tiny_world_base.png"
    section = "tiny-world-pretraining"
    title = "Tiny world pretraining (`scripts/pretrain_tiny_world.py`)"
    shift_latents = False
    defaults: ClassVar[dict] = {
        "vae_steps": 2000,
        "vae_crop_steps": 1600,
        "images": 20000,
        "unet_steps": 8000,
        "lr": 1e-3,
        "caption_dropout": 0.1,
    }
    sheet_sampling: ClassVar[dict] = {
        "num_inference_steps": 25,
        "guidance_scale": 5.0,
        "output_type": "pt",
    }

    def __init__(self) -> None:
        # text encoders are not "trained" in the LoRA sense: the loss reads the embeddings this
        # recipe computes (with their graph, so the encoders learn), dropped ones zeroed
        self.config = TrainConfig.model_validate(
            {"model": {"base_model": "-", "min_snr_gamma": 5.0}}
        )

    def build_vae(self) -> AutoencoderKL:
        return sdxl_world.build_vae()

    def build_base(self, vae: AutoencoderKL, latents: dict) -> SDXLBase:
        torch.manual_seed(step_seed(0, 3, 0))
        vae.register_to_config(scaling_factor=float(latents["scaling_factor"]))
        tokenizer = sdxl_world.world_tokenizer(tiny_world.CAPTION_WORDS)
        text_encoder, text_encoder_2 = sdxl_world.build_text_encoders(tokenizer)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=sdxl_world.build_unet(),
            scheduler=sdxl_world.build_scheduler(),
        )
        return SDXLBase(pipe, prediction_type="epsilon")

    def trained_modules(self, base: SDXLBase) -> dict[str, nn.Module]:
        """By checkpoint key, in the order their parameters are optimised."""
        return {"unet": base.unet, "te1": base.text_encoder, "te2": base.text_encoder_2}

    def loss(self, base: SDXLBase, *, captions, keep, latent_mean, latent_std, generator):
        count = len(captions)
        embeds, pooled = self.family.encode_prompts(base, captions, with_grad=True)
        batch = Batch(
            captions=captions,
            original_sizes=torch.tensor([_SIZE]).expand(count, 2),
            crop_top_lefts=torch.zeros(count, 2, dtype=torch.long),
            target_size=_SIZE,
            latent_mean=latent_mean,
            latent_std=latent_std,
            text={"prompt_embeds": embeds * keep[:, None, None], "pooled": pooled * keep[:, None]},
        )
        return self.family.training_loss(base, batch, generator=generator, config=self.config)

    def save_parts(self, base: SDXLBase, folder: Path) -> None:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            getattr(base, name).save_pretrained(folder / name)
        base.noise_scheduler.save_pretrained(folder / "scheduler")
        sdxl_world.write_model_index(folder)

    def load_config(self, folder: Path) -> TrainConfig:
        return TrainConfig.model_validate({"model": {"base_model": str(folder)}})


class FluxWorld:
    """Transformer, CLIP and T5 together, Flux's flow-matching loss (logit-normal noise levels,
    [dev]'s resolution shift). [dev] samples without classifier-free guidance, so no caption is
    dropped; its guidance embedding is trained on values drawn from 1 to 5 (there is no teacher
    to distil guidance from), so any value in that range samples alike."""

    family = FluxFamily()
    model = "tiny-world-flux"
    sheet = "tiny_world_flux_base.png"
    section = "tiny-world-flux-pretraining"
    title = "Tiny world pretraining, Flux (`scripts/pretrain_tiny_world.py --family flux`)"
    shift_latents = True
    defaults: ClassVar[dict] = {
        "vae_steps": 2000,
        "vae_crop_steps": 1600,
        "images": 20000,
        "unet_steps": 10000,
        "lr": 1e-3,
        "caption_dropout": 0.0,
    }
    sheet_sampling: ClassVar[dict] = {"num_inference_steps": 25, "guidance_scale": 3.5}
    guidance_range = (1.0, 5.0)

    def build_vae(self) -> AutoencoderKL:
        return flux_world.build_vae()

    def build_base(self, vae: AutoencoderKL, latents: dict) -> FluxBase:
        torch.manual_seed(step_seed(0, 3, 0))
        vae.register_to_config(
            shift_factor=float(latents["shift_factor"]),
            scaling_factor=float(latents["scaling_factor"]),
        )
        tokenizer, tokenizer_2 = flux_world.build_tokenizers(tiny_world.CAPTION_WORDS)
        text_encoder, text_encoder_2 = flux_world.build_text_encoders(
            len(tokenizer), len(tokenizer_2)
        )
        pipe = FluxPipeline(
            scheduler=flux_world.build_scheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=flux_world.build_transformer(),
        )
        return FluxBase(pipe, t5_max_length=flux_world.T5_MAX_LENGTH)

    def trained_modules(self, base: FluxBase) -> dict[str, nn.Module]:
        return {
            "transformer": base.transformer,
            "clip": base.text_encoder,
            "t5": base.text_encoder_2,
        }

    def _config(self, guidance: float) -> TrainConfig:
        return TrainConfig.model_validate(
            {
                "model": {
                    "family": "flux",
                    "base_model": "-",
                    "guidance": guidance,
                    "t5_max_length": flux_world.T5_MAX_LENGTH,
                }
            }
        )

    def encode(self, base: FluxBase, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's token embeddings and CLIP's pooled vector, tokenized as FluxPipeline does, with
        their graphs (the family's `encode_prompts` keeps T5 frozen, as LoRA training does)."""
        clip_ids = base.tokenizer(
            captions,
            padding="max_length",
            max_length=base.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        t5_ids = base.tokenizer_2(
            captions,
            padding="max_length",
            max_length=base.t5_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = base.text_encoder(clip_ids).pooler_output
        return base.text_encoder_2(t5_ids).last_hidden_state, pooled

    def loss(self, base: FluxBase, *, captions, keep, latent_mean, latent_std, generator):
        low, high = self.guidance_range
        guidance = low + (high - low) * float(torch.rand((), generator=generator))
        embeds, pooled = self.encode(base, captions)
        count = len(captions)
        batch = Batch(
            captions=captions,
            original_sizes=torch.tensor([_SIZE]).expand(count, 2),
            crop_top_lefts=torch.zeros(count, 2, dtype=torch.long),
            target_size=_SIZE,
            latent_mean=latent_mean,
            latent_std=latent_std,
            text={"prompt_embeds": embeds * keep[:, None, None], "pooled": pooled * keep[:, None]},
        )
        return self.family.training_loss(
            base, batch, generator=generator, config=self._config(guidance)
        )

    def save_parts(self, base: FluxBase, folder: Path) -> None:
        for name in (
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ):
            getattr(base, name).save_pretrained(folder / name)
        base.noise_scheduler.save_pretrained(folder / "scheduler")
        flux_world.write_model_index(folder)

    def load_config(self, folder: Path) -> TrainConfig:
        return TrainConfig.model_validate(flux_world.loading_settings(folder))


RECIPES = {"sdxl": SDXLWorld, "flux": FluxWorld}
