"""Load SDXL base models from a diffusers folder, a hub repo id or a single-file checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from modules.errors import UserError
from modules.models.meta import meta_from_files, meta_module
from modules.models.reference_shapes import CLIP_L, OPEN_CLIP_G, SDXL_UNET, SDXL_VAE
from modules.models.sdxl.config import SDXLModelConfig
from modules.models.sources import check_single_file, load_from_source, offline


def load_sdxl_pipeline(config: SDXLModelConfig) -> StableDiffusionXLPipeline:
    """The base model's components in a pipeline, with an error that says which source failed."""
    return load_from_source(
        config.base_model,
        folder=_from_folder,
        single_file=lambda path: _from_single_file(path, config),
        repo_id=_from_folder,
    )


def meta_sdxl(config: SDXLModelConfig, *, reference: bool = False) -> SimpleNamespace:
    """The UNet, both text encoders and the VAE on the meta device, from the base model's config
    files alone, or at SDXL base 1.0's published shapes (`reference`; also for a single-file
    checkpoint without model.single_file_config: every SDXL checkpoint has those shapes)."""
    if reference:
        return SimpleNamespace(
            unet=meta_module(UNet2DConditionModel, SDXL_UNET),
            text_encoder=meta_module(CLIPTextModel, CLIPTextConfig(**CLIP_L)),
            text_encoder_2=meta_module(CLIPTextModelWithProjection, CLIPTextConfig(**OPEN_CLIP_G)),
            vae=meta_module(AutoencoderKL, SDXL_VAE),
        )
    parts = {
        "unet": UNet2DConditionModel,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
    }

    def single_file(path: Path) -> SimpleNamespace:
        check_single_file(path)
        folder = config.single_file_config.strip()
        return meta_from_files(folder, parts) if folder else meta_sdxl(config, reference=True)

    return load_from_source(
        config.base_model,
        folder=lambda path: meta_from_files(path, parts),
        single_file=single_file,
        repo_id=lambda repo: meta_from_files(repo, parts),
    )


def _from_folder(path: str | Path) -> StableDiffusionXLPipeline:
    def part(cls, sub):
        return cls.from_pretrained(path, subfolder=sub)

    return StableDiffusionXLPipeline(
        vae=part(AutoencoderKL, "vae"),
        text_encoder=part(CLIPTextModel, "text_encoder"),
        text_encoder_2=part(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer=part(CLIPTokenizer, "tokenizer"),
        tokenizer_2=part(CLIPTokenizer, "tokenizer_2"),
        unet=part(UNet2DConditionModel, "unet"),
        scheduler=part(DDPMScheduler, "scheduler"),
    )


def _from_single_file(path: Path, config: SDXLModelConfig) -> StableDiffusionXLPipeline:
    check_single_file(path)
    config_folder = config.single_file_config.strip() or None
    if offline() and config_folder is None:
        raise UserError(
            f"model.base_model {str(path)!r}: a single-file checkpoint needs "
            "model.single_file_config (a local SDXL diffusers folder) when offline"
        )
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=config_folder, local_files_only=offline()
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        unloaded = [key for key, p in getattr(pipe, name).named_parameters() if p.is_meta]
        if unloaded:  # diffusers leaves weights it found no tensor for on the meta device
            raise RuntimeError(
                f"{name} weights missing from the checkpoint: {', '.join(unloaded[:3])}"
            )
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe
