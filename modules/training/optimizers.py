"""Optimizer and LR-scheduler factories with explicit errors for unusable choices."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from modules.config.schema import OptimizerConfig, SchedulerConfig, TrainConfig
from modules.errors import UserError
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


# optimizer arguments that config fields set: extra_kwargs may not set them a second time
FIELD_OF_ARGUMENT = {
    "lr": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay",
    "betas": "optimizer.betas",
    "eps": "optimizer.eps",
    "momentum": "optimizer.momentum",
    "nesterov": "optimizer.nesterov",
}


def optimizer_kwargs(config: OptimizerConfig) -> dict[str, Any]:
    """Keyword arguments of the configured optimizer class: its settings from the config."""
    _, fields = OPTIMIZERS[config.name]
    kwargs = {"lr": config.learning_rate, "weight_decay": config.weight_decay, **fields(config)}
    for key in config.extra_kwargs.keys() & kwargs.keys():
        owner = FIELD_OF_ARGUMENT.get(key)
        fix = f"set {owner} instead" if owner else f"Geodesic fixes it for {config.name}"
        raise UserError(
            f"optimizer.extra_kwargs sets {key!r}, which the config already passes; {fix}"
        )
    return {**kwargs, **config.extra_kwargs}


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
        up = [b for _, b in network.pairs(part)]
        down = [p for p in params if all(p is not b for b in up)]
        groups.append({"params": down, "lr": lr, "name": part})
        groups.append({"params": up, "lr": lr * ratio, "name": f"{part}_up"})
    return groups


def create_optimizer(
    config: OptimizerConfig, groups: list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """Build the configured optimizer over parameter groups (each may carry its own `lr`)."""
    optimizer_class, _ = OPTIMIZERS[config.name]
    try:
        return optimizer_class()(groups, **optimizer_kwargs(config))
    except (TypeError, ValueError) as error:
        if config.extra_kwargs:
            raise _rejected(config, error) from None
        raise


def check_optimizer(config: OptimizerConfig, device: torch.device) -> None:
    """Build the optimizer on a two-element parameter and take two steps, so an `extra_kwargs`
    value it rejects (at construction, or only once its state exists, as SGD's dampening of a
    wrong type does at the second step) is a UserError now, not a traceback mid-run."""
    if not config.extra_kwargs:
        return
    parameter = torch.nn.Parameter(torch.ones(2, device=device))
    parameter.grad = torch.full_like(parameter, 0.5)
    optimizer = create_optimizer(config, [{"params": [parameter]}])
    try:
        optimizer.step()
        optimizer.step()
    except Exception as error:  # whatever the optimizer raises, the cause is the extra value
        raise _rejected(config, error) from None
    if not torch.isfinite(parameter).all():
        raise _rejected(config, ValueError("its steps made the weights inf/NaN"))


def _rejected(config: OptimizerConfig, error: BaseException) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    shown = json.dumps(config.extra_kwargs, default=repr)
    return UserError(
        f"optimizer.extra_kwargs {shown} rejected by {config.name}: {reason}; fix or remove it"
    )


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
