"""The Flux.1 family ([dev] and [schnell]): base model parts, the flow-matching loss, sampling."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.training_utils import compute_loss_weighting_for_sd3
from torch import nn

from modules.config.model_base import PartSpec
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.lora.layouts import LoRALayout
from modules.lora.network import LoRATarget
from modules.models.base import Batch, FileIdentity
from modules.models.flux.config import FluxModelConfig
from modules.models.flux.flow import (
    image_ids,
    pack_latents,
    sample_sigmas,
    text_ids,
    unpack_latents,
)
from modules.models.flux.layers import TRANSFORMER_LAYER_PRESETS, flux_lora_targets
from modules.models.flux.loading import load_flux_pipeline
from modules.models.flux.lora_layouts import FLUX_LORA_LAYOUTS
from modules.models.losses import masked_mse
from modules.util.dtypes import DTYPES

log = logging.getLogger(__name__)

DEV = FileIdentity(base_model_version="flux1", architecture="flux-1-dev/lora")
SCHNELL = FileIdentity(base_model_version="flux1", architecture="flux-1-schnell/lora")
# the smallest noise level the loss weighting sees (SD3's sigma_sqrt weight is 1 / sigma^2)
_MIN_WEIGHTING_SIGMA = 1e-3


class FluxBase(nn.Module):
    """The frozen Flux parts as one module, so devices, dtypes and DDP handle them together."""

    def __init__(self, pipe: FluxPipeline, *, t5_max_length: int) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.text_encoder = pipe.text_encoder
        self.text_encoder_2 = pipe.text_encoder_2
        self.tokenizer = pipe.tokenizer
        self.tokenizer_2 = pipe.tokenizer_2
        self.noise_scheduler = pipe.scheduler
        self.t5_max_length = t5_max_length

    def train(self, mode: bool = True) -> FluxBase:
        """T5 is always frozen, so it stays in eval mode: T5 v1.1 has dropout (0.1), which would
        make live text embeddings random and unlike the cached ones."""
        super().train(mode)
        self.text_encoder_2.eval()
        return self

    @property
    def guidance_distilled(self) -> bool:
        """[dev] embeds the guidance value; [schnell] does not."""
        return bool(self.transformer.config.guidance_embeds)


class FluxSampler:
    """FluxPipeline with the run's T5 length, decoding with the float32 VAE.

    `guidance_scale` (sampling.cfg_scale) is the embedded guidance of [dev] (3.5 is the usual
    value); [schnell] ignores it. FluxPipeline decodes in the text encoders' dtype, which a
    float32 VAE does not take, so the pipeline stops at the latents and the VAE decodes them here.
    """

    def __init__(self, pipe: FluxPipeline, *, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self._told_about_negative_prompt = False

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def __call__(
        self, *, height: int, width: int, negative_prompt: str | None = None, **kwargs: Any
    ) -> FluxPipelineOutput:
        if negative_prompt and not self._told_about_negative_prompt:
            log.warning("Flux.1 samples without a negative prompt; sampling.negative_prompt unused")
            self._told_about_negative_prompt = True
        packed = self.pipe(
            height=height,
            width=width,
            max_sequence_length=self.max_sequence_length,
            output_type="latent",
            **kwargs,
        ).images
        vae, factor = self.pipe.vae, 2 * self.pipe.vae_scale_factor  # 2x2 packing
        latents = unpack_latents(
            packed.float(), height=2 * (height // factor), width=2 * (width // factor)
        )
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]
        return FluxPipelineOutput(images=self.pipe.image_processor.postprocess(image))


class FluxFamily:
    name = "flux"
    config_class = FluxModelConfig
    identity = DEV  # set from the loaded transformer by `load` ([schnell] has no guidance)
    latent_multiple = 64  # 8x VAE and 2x2 packing need 16; buckets step by 64 as for SDXL
    layer_presets = TRANSFORMER_LAYER_PRESETS

    @property
    def parts(self) -> list[PartSpec]:
        return FluxModelConfig.part_specs()

    def lora_layouts(self, model: FluxBase) -> tuple[LoRALayout, ...]:
        return FLUX_LORA_LAYOUTS

    def load(self, config: TrainConfig) -> FluxBase:
        settings = config.model
        if settings.quantize_base != "none" or settings.offload_blocks:
            raise UserError(
                "model.quantize_base / model.offload_blocks are not available in this version "
                "yet; set model.quantize_base none and model.offload_blocks 0"
            )
        base = FluxBase(load_flux_pipeline(settings), t5_max_length=settings.t5_max_length)
        base.requires_grad_(False)
        for part, part_settings in settings.parts().items():
            module, dtype = getattr(base, part), DTYPES[part_settings.weight_dtype]
            if module.dtype != dtype:
                module.to(dtype=dtype)
        if base.vae.dtype != torch.float32:
            base.vae.to(dtype=torch.float32)
        self.identity = DEV if base.guidance_distilled else SCHNELL
        return base

    def lora_targets(
        self, model: FluxBase, config: TrainConfig
    ) -> list[tuple[LoRATarget, list[str]]]:
        return flux_lora_targets(
            modules={part: getattr(model, part) for part in config.model.parts()},
            train_parts=set(config.model.trained_parts()),
            layer_preset=config.lora.layer_preset,
            layer_patterns=config.lora.layer_patterns,
        )

    def enable_gradient_checkpointing(self, model: FluxBase) -> None:
        model.transformer.enable_gradient_checkpointing()
        model.text_encoder.activation_checkpointing_enable()  # T5 is never trained

    # -- encoders ---------------------------------------------------------------------------------

    def encode_prompts(
        self, model: FluxBase, captions: list[str], *, with_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's last hidden states and CLIP-L's pooled output, tokenized as FluxPipeline does."""
        device = model.transformer.device
        with torch.set_grad_enabled(with_grad):
            ids = model.tokenizer(
                captions,
                padding="max_length",
                max_length=model.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(model.text_encoder.device)  # an offloaded encoder runs where it is
            pooled = model.text_encoder(ids).pooler_output.to(device)
        with torch.no_grad():
            ids = model.tokenizer_2(
                captions,
                padding="max_length",
                max_length=model.t5_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(model.text_encoder_2.device)
            prompt_embeds = model.text_encoder_2(ids).last_hidden_state.to(device)
        return prompt_embeds, pooled

    def encode_text(self, model: FluxBase, captions: list[str]) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled = self.encode_prompts(model, captions, with_grad=False)
        return {"prompt_embeds": prompt_embeds, "pooled": pooled}

    def text_cache_key(self, model: FluxBase) -> str:
        return f"t5_max_length={model.t5_max_length}"

    def encode_latents(
        self, model: FluxBase, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vae = model.vae
        with torch.no_grad(), torch.autocast(vae.device.type, enabled=False):
            dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def latent_encoder(self, model: FluxBase) -> nn.Module:
        return model.vae

    def text_encoders(self, model: FluxBase) -> list[nn.Module]:
        return [model.text_encoder, model.text_encoder_2]

    # -- the loss ---------------------------------------------------------------------------------

    def training_loss(
        self,
        model: FluxBase,
        batch: Batch,
        *,
        generator: torch.Generator,
        config: TrainConfig,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow matching: x_sigma = (1 - sigma) x + sigma noise, the transformer predicts the
        velocity noise - x. `timesteps` (validation) are 0-999 and mean sigma = t / 1000."""
        settings = config.model
        transformer = model.transformer
        device, dtype = transformer.device, transformer.dtype
        with torch.no_grad():
            if batch.latent_mean is None:
                mean, std = self.encode_latents(model, batch.pixels)
            else:
                mean, std = batch.latent_mean, batch.latent_std
            mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
            # noise drawn on the CPU generator: identical streams on every device, exact resume
            eps = torch.randn(mean.shape, generator=generator).to(device)
            vae_config = model.vae.config
            latents = (mean + std * eps - vae_config.shift_factor) * vae_config.scaling_factor
        train_te = settings.trains_text_encoder()
        if batch.text is not None and not train_te:
            prompt_embeds, pooled = batch.text["prompt_embeds"], batch.text["pooled"]
        else:
            prompt_embeds, pooled = self.encode_prompts(model, batch.captions, with_grad=train_te)

        size, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if timesteps is None:
            sigmas = sample_sigmas(
                settings,
                batch_size=size,
                image_tokens=(height // 2) * (width // 2),
                scheduler_config=model.noise_scheduler.config,
                generator=generator,
            )
        else:
            sigmas = timesteps.float() / 1000
        sigmas = sigmas.to(device)
        expanded = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - expanded) * latents + expanded * noise
        guidance = None
        if model.guidance_distilled:
            guidance = torch.full((size,), settings.guidance, device=device)
        prediction = transformer(
            hidden_states=pack_latents(noisy).to(dtype),
            encoder_hidden_states=prompt_embeds.to(device, dtype),
            pooled_projections=pooled.to(device, dtype),
            timestep=sigmas.to(dtype),
            img_ids=image_ids(height, width, device=device),
            txt_ids=text_ids(prompt_embeds.shape[1], device=device),
            guidance=guidance,
            return_dict=False,
        )[0]
        prediction = unpack_latents(prediction, height=height, width=width)

        loss = masked_mse(
            prediction, noise - latents, batch.masks, unmasked=config.data.unmasked_weight
        )
        if settings.loss_weighting != "none":
            loss = loss * compute_loss_weighting_for_sd3(
                settings.loss_weighting, sigmas.clamp_min(_MIN_WEIGHTING_SIGMA)
            )
        if batch.loss_weights is not None:
            loss = loss * batch.loss_weights.to(device)
        return loss.mean()

    # -- sampling ---------------------------------------------------------------------------------

    def sampling_pipeline(self, model: FluxBase) -> FluxSampler:
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config),
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2,
            transformer=model.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return FluxSampler(pipe, max_sequence_length=model.t5_max_length)
