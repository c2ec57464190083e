"""Optimizer and LR-scheduler factories with explicit errors for unusable choices."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler

from modules.config.schema import OptimizerConfig, SchedulerConfig
from modules.errors import UserError


def _adamw(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        **config.extra_kwargs,
    )


def _sgd(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups,
        lr=config.learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        **config.extra_kwargs,
    )


def _adafactor(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    kwargs = {
        "scale_parameter": False,
        "relative_step": False,
        "warmup_init": False,
        **config.extra_kwargs,
    }
    return Adafactor(groups, lr=config.learning_rate, weight_decay=config.weight_decay, **kwargs)


def _prodigy(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(
        groups,
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        **config.extra_kwargs,
    )


def _adamw_8bit(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise UserError(
            "optimizer.name 'adamw_8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine"
        )
    try:
        import bitsandbytes
    except ImportError as error:
        raise UserError(
            f"optimizer.name 'adamw_8bit' needs bitsandbytes ({error}); install requirements-gpu.txt or use 'adamw'"
        ) from None
    return bitsandbytes.optim.AdamW8bit(
        groups,
        lr=config.learning_rate,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        **config.extra_kwargs,
    )


OPTIMIZERS = {
    "adamw": _adamw,
    "adamw_8bit": _adamw_8bit,
    "sgd": _sgd,
    "adafactor": _adafactor,
    "prodigy": _prodigy,
}


def create_optimizer(
    config: OptimizerConfig, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """Build the configured optimizer over parameter groups (each may carry its own `lr`)."""
    try:
        return OPTIMIZERS[config.name](config, groups)
    except TypeError as error:
        if config.extra_kwargs:
            raise UserError(
                f"optimizer.extra_kwargs {sorted(config.extra_kwargs)} rejected by {config.name}: {error}"
            ) from None
        raise


def create_scheduler(
    config: SchedulerConfig, optimizer: torch.optim.Optimizer, *, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return get_scheduler(
        config.name,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
        num_cycles=config.cycles,
    )
