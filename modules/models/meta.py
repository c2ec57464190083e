"""Architectures without weights: meta-device copies of diffusers and transformers models.

The memory estimate counts and traces these instead of the loaded (possibly quantized,
offloaded, LoRA-carrying) modules, and the benchmark builds Flux.1 and SDXL at full size this
way on any machine.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from torch import nn
from transformers import PreTrainedModel


def meta_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module`'s architecture (from its config) on the meta device."""
    with torch.device("meta"):
        if isinstance(module, ModelMixin):
            copy = type(module).from_config(module.config)
        elif isinstance(module, PreTrainedModel):
            copy = type(module)(module.config)
        else:
            raise TypeError(
                f"no meta copy of a {type(module).__name__}: not a diffusers or transformers model"
            )
    copy.requires_grad_(False)
    return copy
