"""The small protocol every model family implements, and the registry of families."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from modules.config.schema import TrainConfig
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
    """What the trainer needs from a model family (SDXL now, Flux.1 later)."""

    name: str
    identity: FileIdentity
    latent_multiple: int  # image sides must be multiples of this

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

    def latent_encoder(self, model: nn.Module) -> nn.Module:
        """The module encode_latents runs (the VAE), to fingerprint and offload it."""

    def text_encoders(self, model: nn.Module) -> list[nn.Module]:
        """The modules encode_text runs, to fingerprint and offload them."""

    def sampling_pipeline(self, model: nn.Module) -> Any:
        """A diffusers pipeline sharing the (LoRA-applied) modules of `model`."""

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing in the trainable parts."""


def get_family(name: str) -> ModelFamily:
    from modules.models.sdxl import SDXLFamily  # local import: families pull in heavy libraries

    families: dict[str, ModelFamily] = {"sdxl": SDXLFamily()}
    return families[name]
