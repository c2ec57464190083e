"""Architectures without weights: meta-device copies of diffusers and transformers models.

The memory estimate counts and traces these instead of the loaded (possibly quantized,
offloaded, LoRA-carrying) modules; without a loaded model (the GUI, the benchmark) the families
build theirs from config files alone, or at their reference models' shapes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import ModelMixin
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from modules.models.sources import offline


def meta_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of `module`'s architecture (from its config) on the meta device."""
    if not isinstance(module, ModelMixin | PreTrainedModel):
        raise TypeError(
            f"no meta copy of a {type(module).__name__}: not a diffusers or transformers model"
        )
    return meta_module(type(module), module.config)


def meta_module(cls: type[nn.Module], config: dict | PretrainedConfig) -> nn.Module:
    """A frozen `cls` built from `config` (a diffusers config dict or a transformers config) on
    the meta device."""
    with torch.device("meta"):
        module = cls.from_config(config) if issubclass(cls, ModelMixin) else cls(config)
    module.requires_grad_(False)
    return module


def meta_from_files(source: str | Path, parts: dict[str, type[nn.Module]]) -> SimpleNamespace:
    """The modules `parts` names (attribute name = subfolder -> class) as the config files in
    `source`'s subfolders (a diffusers folder or repo id) describe them, on the meta device:
    their config files are all that is read."""
    modules = {}
    for name, cls in parts.items():
        if issubclass(cls, ModelMixin):
            config = cls.load_config(source, subfolder=name, local_files_only=offline())
        elif issubclass(cls, PreTrainedModel):
            config = cls.config_class.from_pretrained(source, subfolder=name)
        else:
            raise TypeError(f"{cls.__name__} is not a diffusers or transformers model")
        modules[name] = meta_module(cls, config)
    return SimpleNamespace(**modules)
