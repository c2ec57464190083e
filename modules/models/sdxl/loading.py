"""Load SDXL base models from a diffusers folder, a hub repo id or a single-file checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from modules.errors import UserError
from modules.models.sdxl.config import SDXLModelConfig

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")


def load_sdxl_pipeline(config: SDXLModelConfig) -> StableDiffusionXLPipeline:
    """The base model's components in a pipeline, with an error that says which source failed."""
    source = config.base_model.strip()
    if not source:
        raise UserError(
            "model.base_model is empty: set it to a diffusers folder, repo id or .safetensors file"
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return _attempt("local diffusers folder", source, lambda: _from_folder(path))
    if path.is_file() or path.suffix.lower() in (*SINGLE_FILE_SUFFIXES, ".ckpt", ".pt", ".bin"):
        return _attempt("single-file checkpoint", source, lambda: _from_single_file(path, config))
    return _attempt("Hugging Face repo id", source, lambda: _from_folder(source))


def _attempt(kind: str, source: str, load):
    try:
        return load()
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ""
        if kind == "Hugging Face repo id" and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (offline: HF_HUB_OFFLINE=1; point model.base_model at a local folder or file)"
        elif kind == "Hugging Face repo id":
            hint = " (not a local folder or file either; check the path)"
        raise UserError(f"model.base_model {source!r} as a {kind} failed: {reason}{hint}") from None


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
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UserError(
            f"model.base_model {str(path)!r}: only .safetensors single files are loaded (pickled "
            f"{path.suffix} checkpoints can run code); convert it to .safetensors first"
        )
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    config_folder = config.single_file_config.strip() or None
    if offline and config_folder is None:
        raise UserError(
            f"model.base_model {str(path)!r}: a single-file checkpoint needs "
            "model.single_file_config (a local SDXL diffusers folder) when offline"
        )
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=config_folder, local_files_only=offline
    )
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        unloaded = [key for key, p in getattr(pipe, name).named_parameters() if p.is_meta]
        if unloaded:  # diffusers leaves weights it found no tensor for on the meta device
            raise RuntimeError(
                f"{name} weights missing from the checkpoint: {', '.join(unloaded[:3])}"
            )
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe
