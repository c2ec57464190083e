"""Load SDXL base models from a diffusers folder, a hub repo id or a single-file checkpoint."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from modules.errors import UserError
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
