"""The LoRA network a run trains (fresh on the family's targets, or continued from a file) and
the module accelerate prepares around it.

The family says where LoRA goes (`lora_targets`) and how its layers are laid out
(`lora_layouts`); `lora.init_from` continues a file written by this or another trainer.
"""

from __future__ import annotations

import torch
from torch import nn

from modules.config.schema import TrainConfig
from modules.lora.init_from import network_from_file
from modules.lora.network import LayerCatalog, LoRANetwork
from modules.models.base import Batch, ModelFamily
from modules.util.dtypes import DTYPES


def build_network(
    *, config: TrainConfig, family: ModelFamily, base: nn.Module, announce: bool
) -> LoRANetwork:
    """The run's network in the training dtype, with the base set up to train through it. With
    `lora.init_from`: the file's layers at its own ranks, whichever trainer wrote it, plus new
    layers for trained parts it has none of; `announce` prints what it brought (the main process
    does)."""
    targets = family.lora_targets(base, config)
    layouts = family.lora_layouts(base)
    if config.lora.init_from:
        # every part, so a file's layers in a part this config leaves frozen are named as such
        every_part = family.lora_targets(base, _all_parts(config))
        continued = network_from_file(
            config.lora.init_from,
            targets=targets,
            catalog=LayerCatalog(target for target, _ in every_part),
            layouts=layouts,
            part_labels={spec.name: spec.label for spec in config.model.part_specs()},
            model_name=config.model.family.upper(),
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
        )
        if announce:
            print(continued.summary, flush=True)
        network = continued.network
    else:
        network = LoRANetwork.inject(
            targets,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            layouts=layouts,
        )
    network.to(dtype=DTYPES[config.model.train_dtype])
    if config.training.gradient_checkpointing:
        family.enable_gradient_checkpointing(base)
    base.train()
    return network


class TrainingModel(nn.Module):
    """The LoRA network as accelerate prepares it (DDP synchronises its parameters), with the
    loss through the base model as its forward pass.

    The base is not a submodule (as LoRA adapters hold their base layers): the trainer places it
    itself, leaving encoders that are done with in CPU memory, which `prepare` moving the whole
    module would undo, and its frozen weights are never broadcast between processes.
    """

    def __init__(
        self, *, family: ModelFamily, base: nn.Module, network: LoRANetwork, config: TrainConfig
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)
        self.network = network
        self._family = family
        self._config = config

    @property
    def base(self) -> nn.Module:
        return self._base

    def forward(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self._family.training_loss(
            self.base, batch, generator=generator, config=self._config
        )


def _all_parts(config: TrainConfig) -> TrainConfig:
    """`config` as if it trained every part that can be trained."""
    parts = {
        spec.name: getattr(config.model, spec.name).model_copy(update={"train": True})
        for spec in config.model.part_specs()
        if spec.trainable
    }
    return config.model_copy(update={"model": config.model.model_copy(update=parts)})
