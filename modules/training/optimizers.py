"""Optimizer and LR-scheduler factories with explicit errors for unusable choices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from modules.config.schema import OptimizerConfig, SchedulerConfig, TrainConfig
from modules.errors import UserError
from modules.lora.layers import LORA_ROLE_B
from modules.lora.network import LoRANetwork


def _adafactor_class() -> type[torch.optim.Optimizer]:
    from transformers.optimization import Adafactor

    return Adafactor


def _prodigy_class() -> type[torch.optim.Optimizer]:
    from prodigyopt import Prodigy

    return Prodigy


def _adamw_8bit_class() -> type[torch.optim.Optimizer]:
    if not torch.cuda.is_available():
        raise UserError(
            "optimizer.name 'adamw_8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' here"
        )
    try:
        import bitsandbytes
    except ImportError as error:
        raise UserError(
            f"optimizer.name 'adamw_8bit' needs bitsandbytes ({error}); "
            "pip install -r requirements.txt, or use 'adamw'"
        ) from None
    return bitsandbytes.optim.AdamW8bit


def _adam_like(config: OptimizerConfig) -> dict[str, Any]:
    return {"betas": config.betas, "eps": config.eps}


# name -> (optimizer class, the config fields it takes besides lr and weight_decay)
OPTIMIZERS: dict[
    str,
    tuple[Callable[[], type[torch.optim.Optimizer]], Callable[[OptimizerConfig], dict[str, Any]]],
] = {
    "adamw": (lambda: torch.optim.AdamW, _adam_like),
    "adamw_8bit": (_adamw_8bit_class, _adam_like),
    "prodigy": (_prodigy_class, _adam_like),
    "sgd": (lambda: torch.optim.SGD, lambda c: {"momentum": c.momentum, "nesterov": c.nesterov}),
    # fixed learning rate: Adafactor's own relative-step schedule would fight the LR scheduler
    "adafactor": (
        _adafactor_class,
        lambda c: {"scale_parameter": False, "relative_step": False, "warmup_init": False},
    ),
}


def lora_param_groups(*, network: LoRANetwork, config: TrainConfig) -> list[dict[str, Any]]:
    """One group per model part; with LoRA+ each part splits into its A and its B factors."""
    groups = []
    ratio = config.lora.loraplus_ratio
    settings = config.model.parts()
    for part in network.parts():
        lr = settings[part].learning_rate or config.optimizer.learning_rate
        params = network.parameters_of(part)
        if ratio == 1:
            groups.append({"params": params, "lr": lr, "name": part})
            continue
        up = [p for p in params if getattr(p, "_lora_role", None) == LORA_ROLE_B]
        down = [p for p in params if getattr(p, "_lora_role", None) != LORA_ROLE_B]
        groups.append({"params": down, "lr": lr, "name": part})
        groups.append({"params": up, "lr": lr * ratio, "name": f"{part}_up"})
    return groups


def create_optimizer(
    config: OptimizerConfig, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """Build the configured optimizer over parameter groups (each may carry its own `lr`)."""
    optimizer_class, fields = OPTIMIZERS[config.name]
    kwargs = {**fields(config), **config.extra_kwargs}
    try:
        return optimizer_class()(
            groups, lr=config.learning_rate, weight_decay=config.weight_decay, **kwargs
        )
    except TypeError as error:
        if config.extra_kwargs:
            raise UserError(
                f"optimizer.extra_kwargs {sorted(config.extra_kwargs)} rejected by "
                f"{config.name}: {error}"
            ) from None
        raise


def create_scheduler(
    config: SchedulerConfig, optimizer: torch.optim.Optimizer, *, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    # diffusers' "constant" ignores num_warmup_steps; its warm-up variant is the same schedule
    name = "constant_with_warmup" if config.name == "constant" else config.name
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.cycles,
    )
