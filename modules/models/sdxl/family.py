"""The SDXL family: base model parts, the epsilon / v-prediction training loss, and sampling."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.training_utils import compute_snr
from torch import nn

from modules.config.model_base import PartSpec
from modules.config.schema import TrainConfig
from modules.lora.layouts import LoRALayout
from modules.lora.network import LoRATarget
from modules.models.base import Batch, FileIdentity
from modules.models.losses import masked_mse
from modules.models.sdxl.config import SDXLModelConfig
from modules.models.sdxl.keys import sdxl_lora_layouts
from modules.models.sdxl.layers import UNET_LAYER_PRESETS, sdxl_lora_targets
from modules.models.sdxl.loading import load_sdxl_pipeline
from modules.util.dtypes import DTYPES


class SDXLBase(nn.Module):
    """The frozen SDXL parts as one module, so devices, dtypes and DDP handle them together."""

    def __init__(self, pipe: StableDiffusionXLPipeline, *, prediction_type: str) -> None:
        super().__init__()
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = pipe.text_encoder_2
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = pipe.tokenizer_2
        self.noise_scheduler = pipe.scheduler
        self.prediction_type = prediction_type


class SDXLFamily:
    name = "sdxl"
    config_class = SDXLModelConfig
    identity = FileIdentity(
        base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora"
    )
    latent_multiple = 64
    layer_presets = UNET_LAYER_PRESETS

    @property
    def parts(self) -> list[PartSpec]:
        return SDXLModelConfig.part_specs()

    def lora_layouts(self, model: SDXLBase) -> tuple[LoRALayout, ...]:
        """kohya with the original (SGM) UNet names sd-scripts needs, and diffusers/PEFT."""
        return sdxl_lora_layouts(model.unet.config)

    def load(self, config: TrainConfig) -> SDXLBase:
        pipe = load_sdxl_pipeline(config.model)
        prediction_type = config.model.prediction_type
        if prediction_type == "auto":
            prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        base = SDXLBase(pipe, prediction_type=prediction_type)
        base.requires_grad_(False)
        for part, settings in config.model.parts().items():
            module, dtype = getattr(base, part), DTYPES[settings.weight_dtype]
            if module.dtype != dtype:
                module.to(dtype=dtype)
        if base.vae.dtype != torch.float32:
            base.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16
        return base

    def lora_targets(
        self, model: SDXLBase, config: TrainConfig
    ) -> list[tuple[LoRATarget, list[str]]]:
        return sdxl_lora_targets(
            modules={part: getattr(model, part) for part in config.model.parts()},
            train_parts=set(config.model.trained_parts()),
            layer_preset=config.lora.layer_preset,
            layer_patterns=config.lora.layer_patterns,
        )

    def enable_gradient_checkpointing(self, model: SDXLBase) -> None:
        model.unet.enable_gradient_checkpointing()
        for encoder in (model.text_encoder, model.text_encoder_2):
            encoder.activation_checkpointing_enable()  # transformers 5 renamed it

    def encode_prompts(
        self, model: SDXLBase, captions: list[str], *, with_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states of both CLIPs concatenated, and the pooled CLIP-G embedding."""
        device = model.unet.device
        hidden, pooled = [], None
        with torch.set_grad_enabled(with_grad):
            for tokenizer, encoder in (
                (model.tokenizer, model.text_encoder),
                (model.tokenizer_2, model.text_encoder_2),
            ):
                ids = tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(encoder.device)  # an offloaded encoder runs where it is
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2].to(device))
                if encoder is model.text_encoder_2:
                    pooled = out.text_embeds.to(device)
        return torch.cat(hidden, dim=-1), pooled

    def encode_text(self, model: SDXLBase, captions: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled = self.encode_prompts(model, captions, with_grad=False)
        return {"prompt_embeds": prompt_embeds, "pooled": pooled}

    def encode_latents(
        self, model: SDXLBase, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Always in float32 without autocast: the SDXL VAE overflows in fp16."""
        vae = model.vae
        with torch.no_grad(), torch.autocast(vae.device.type, enabled=False):
            dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def text_cache_key(self, model: SDXLBase) -> str:
        return ""  # both CLIP tokenizers always pad to 77 tokens

    def latent_encoder(self, model: SDXLBase) -> nn.Module:
        return model.vae

    def text_encoders(self, model: SDXLBase) -> list[nn.Module]:
        return [model.text_encoder, model.text_encoder_2]

    def training_loss(
        self,
        model: SDXLBase,
        batch: Batch,
        *,
        generator: torch.Generator,
        config: TrainConfig,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device, unet_dtype = model.unet.device, model.unet.dtype
        with torch.no_grad():
            if batch.latent_mean is None:
                mean, std = self.encode_latents(model, batch.pixels)
            else:
                mean, std = batch.latent_mean, batch.latent_std
            mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
            # noise drawn on the CPU generator: identical streams on every device, exact resume
            eps = torch.randn(mean.shape, generator=generator).to(device)
            latents = (mean + std * eps) * model.vae.config.scaling_factor
        train_te = config.model.trains_text_encoder()
        if batch.text is not None and not train_te:
            prompt_embeds, pooled = batch.text["prompt_embeds"], batch.text["pooled"]
        else:
            prompt_embeds, pooled = self.encode_prompts(model, batch.captions, with_grad=train_te)

        scheduler = model.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if timesteps is None:
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
            )
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if model.prediction_type == "epsilon"
            else scheduler.get_velocity(latents, noise, timesteps)
        )

        target_size = torch.tensor(batch.target_size).expand(latents.shape[0], 2)
        time_ids = torch.cat([batch.original_sizes, batch.crop_top_lefts, target_size], dim=1)
        prediction = model.unet(
            noisy.to(unet_dtype),
            timesteps,
            encoder_hidden_states=prompt_embeds.to(device, unet_dtype),
            added_cond_kwargs={
                "text_embeds": pooled.to(device, unet_dtype),
                "time_ids": time_ids.to(device, unet_dtype),
            },
        ).sample

        loss = masked_mse(prediction, target, batch.masks, unmasked=config.data.unmasked_weight)
        gamma = config.model.min_snr_gamma
        if gamma > 0:
            snr = compute_snr(scheduler, timesteps)
            clipped = torch.clamp(snr, max=gamma)
            weight = clipped / snr if model.prediction_type == "epsilon" else clipped / (snr + 1)
            loss = loss * weight
        if batch.loss_weights is not None:
            loss = loss * batch.loss_weights.to(device)
        return loss.mean()

    def sampling_pipeline(self, model: SDXLBase) -> StableDiffusionXLPipeline:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.unet,
            scheduler=EulerDiscreteScheduler.from_config(model.noise_scheduler.config),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
