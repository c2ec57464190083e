"""The small protocol every model family implements (the registry is in `registry.py`).

A family owns everything specific to its architecture: its config section (parts and options),
loading, which layers get LoRA, the training loss, text and latent encoding, sampling and the
names its LoRA files use. The trainer, data pipeline, sampler and formats only go through this
protocol and the `PartSpec`s of the family's config section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from modules.config.model_base import FamilyModelConfig, PartSpec

if TYPE_CHECKING:
    from modules.config.schema import TrainConfig
    from modules.lora.layouts import LoRALayout
    from modules.lora.network import LoRATarget


@dataclass(frozen=True)
class FileIdentity:
    """How saved LoRA files identify the base architecture to other tools."""

    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture


@dataclass
class Batch:
    """One micro-batch as the data pipeline produces it (all images from one bucket).

    Either pixels or cached latents are set, and cached text embeddings may stand in for running
    the text encoders; captions are always there.
    """

    captions: list[str]
    original_sizes: torch.Tensor  # (B, 2) height, width before resize/crop
    crop_top_lefts: torch.Tensor  # (B, 2) top, left of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], when latents are not cached
    latent_mean: torch.Tensor | None = None  # (B, C, H/f, W/f), unscaled, from the latent cache
    latent_std: torch.Tensor | None = None
    text: dict[str, torch.Tensor] | None = None  # cached encode_text outputs, batched
    masks: torch.Tensor | None = None  # (B, 1, H, W) in [0, 1]: loss weight map (masked training)
    loss_weights: torch.Tensor | None = None  # (B,) per-image loss multipliers (concept weight)

    def __len__(self) -> int:
        return len(self.captions)

    def pin_memory(self) -> Batch:
        """Page-locked copy for faster host-to-GPU copies (called by torch's DataLoader)."""
        pinned = {
            name: value.pin_memory() if isinstance(value, torch.Tensor) else value
            for name, value in vars(self).items()
        }
        if self.text is not None:
            pinned["text"] = {k: v.pin_memory() for k, v in self.text.items()}
        return Batch(**pinned)


class ModelFamily(Protocol):
    """What the trainer needs from a model family."""

    name: str
    config_class: type[FamilyModelConfig]  # its `model` section, which declares its parts
    identity: FileIdentity
    latent_multiple: int  # image sides must be multiples of this
    # lora.layer_preset -> the layer patterns of its denoiser (the names mean the same in every
    # family: attn, attn-mlp, full); text encoders take their attention and MLP layers
    layer_presets: dict[str, list[str]]

    @property
    def parts(self) -> list[PartSpec]:
        """The base model's parts (from `config_class`), in declaration order."""

    def lora_layouts(self, model: nn.Module) -> tuple[LoRALayout, ...]:
        """The LoRA file layouts it writes and reads for the loaded `model`, named as
        `config_class.lora_formats`; other trainers' names for a layer are read too."""

    def load(self, config: TrainConfig) -> nn.Module:
        """Load the base model parts as one module (frozen, in their weight dtypes)."""

    def lora_targets(
        self, model: nn.Module, config: TrainConfig
    ) -> list[tuple[LoRATarget, list[str]]]:
        """The parts and layer patterns that get LoRA."""

    def training_loss(
        self,
        model: nn.Module,
        batch: Batch,
        *,
        generator: torch.Generator,
        config: TrainConfig,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The per-batch training loss (float32 scalar) with LoRA applied.

        `timesteps` fixes the diffusion timesteps (validation) instead of drawing them.
        """

    def encode_latents(
        self, model: nn.Module, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the latent distribution of `pixels`, unscaled (what the cache keeps)."""

    def encode_text(self, model: nn.Module, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text-encoder outputs, first dimension per caption; training_loss reads Batch.text."""

    def text_cache_key(self, model: nn.Module) -> str:
        """What besides the text encoders' weights shapes encode_text's outputs (e.g. a token
        length); it keys the text cache, so "" when nothing does."""

    def latent_encoder(self, model: nn.Module) -> nn.Module:
        """The module encode_latents runs (the VAE), to fingerprint and offload it."""

    def text_encoders(self, model: nn.Module) -> list[nn.Module]:
        """The modules encode_text runs, to fingerprint and offload them."""

    def sampling_pipeline(self, model: nn.Module) -> Any:
        """A diffusers pipeline sharing the (LoRA-applied) modules of `model`."""

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing in the trainable parts."""
