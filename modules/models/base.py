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
    """One micro-batch as the data reader produces it."""

    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]
    original_sizes: torch.Tensor  # (B, 2) height, width before resize/crop
    crop_top_lefts: torch.Tensor  # (B, 2) top, left of the crop in the resized image


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
        self, model: nn.Module, batch: Batch, *, generator: torch.Generator, config: TrainConfig
    ) -> torch.Tensor:
        """The per-batch training loss (float32 scalar) with LoRA applied."""

    def sampling_pipeline(self, model: nn.Module) -> Any:
        """A diffusers pipeline sharing the (LoRA-applied) modules of `model`."""

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing in the trainable parts."""


def get_family(name: str) -> ModelFamily:
    from modules.models.sdxl import SDXLFamily  # local import: families pull in heavy libraries

    families: dict[str, ModelFamily] = {"sdxl": SDXLFamily()}
    return families[name]
