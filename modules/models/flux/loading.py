"""Load Flux.1 base models from a diffusers folder, a hub repo id, or a single-file transformer
(BFL's `flux1-dev.safetensors`, ComfyUI's diffusion-model files) with the rest from a folder.

Each part is loaded straight in its configured dtype: Flux's 12B transformer in float32 would need
48 GB of memory on the way to bfloat16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    T5EncoderModel,
    T5TokenizerFast,
)

from modules.errors import UserError
from modules.models.flux.config import FluxModelConfig
from modules.models.sources import check_single_file, load_from_source, offline
from modules.util.dtypes import DTYPES


def load_flux_pipeline(config: FluxModelConfig) -> FluxPipeline:
    """The base model's components in a FluxPipeline, with an error naming the failed source."""
    return load_from_source(
        config.base_model,
        folder=lambda path: _from_folder(path, config),
        single_file=lambda path: _from_single_file(path, config),
        repo_id=lambda repo: _from_folder(repo, config),
    )


def _dtype(config: FluxModelConfig, part: str) -> torch.dtype:
    return DTYPES[config.parts()[part].weight_dtype]


def _from_folder(
    source: str | Path,
    config: FluxModelConfig,
    *,
    transformer: FluxTransformer2DModel | None = None,
) -> FluxPipeline:
    def part(cls, subfolder: str, dtype: torch.dtype | None = None):
        if dtype is None:  # tokenizers, scheduler
            return cls.from_pretrained(source, subfolder=subfolder)
        # transformers 5 names the argument `dtype`, diffusers `torch_dtype`
        key = "dtype" if issubclass(cls, PreTrainedModel) else "torch_dtype"
        return cls.from_pretrained(source, subfolder=subfolder, **{key: dtype})

    if transformer is None:
        transformer = part(FluxTransformer2DModel, "transformer", _dtype(config, "transformer"))
    return FluxPipeline(
        scheduler=part(FlowMatchEulerDiscreteScheduler, "scheduler"),
        # the VAE stays float32: it only encodes each image once for the latent cache
        vae=part(AutoencoderKL, "vae", torch.float32),
        text_encoder=part(CLIPTextModel, "text_encoder", _dtype(config, "text_encoder")),
        tokenizer=part(CLIPTokenizer, "tokenizer"),
        text_encoder_2=part(T5EncoderModel, "text_encoder_2", _dtype(config, "text_encoder_2")),
        tokenizer_2=part(T5TokenizerFast, "tokenizer_2"),
        transformer=transformer,
    )


def _from_single_file(path: Path, config: FluxModelConfig) -> FluxPipeline:
    check_single_file(path)
    folder = config.single_file_config.strip()
    if not folder:
        raise UserError(
            f"model.base_model {str(path)!r}: a single-file Flux transformer needs "
            "model.single_file_config, a Flux diffusers folder (or repo id, online) that gives "
            "its config, the VAE, both text encoders and their tokenizers"
        )
    transformer = FluxTransformer2DModel.from_single_file(
        str(path),
        config=folder,
        subfolder="transformer",
        torch_dtype=_dtype(config, "transformer"),
        local_files_only=offline(),
    )
    unloaded = [key for key, p in transformer.named_parameters() if p.is_meta]
    if unloaded:  # diffusers leaves weights it found no tensor for on the meta device
        raise RuntimeError(f"transformer weights missing from the file: {', '.join(unloaded[:3])}")
    return _from_folder(folder, config, transformer=transformer)
