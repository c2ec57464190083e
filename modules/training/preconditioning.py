"""Wire the LoRA preconditioner into a run from the config: settings, coverage report, hook."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.lora.network import LoRANetwork
from modules.lora.preconditioning import Damping, LoRAPreconditioner, Settings, find_coverage

log = logging.getLogger(__name__)


def settings_from(config: TrainConfig) -> Settings:
    lora = config.lora
    return Settings(
        method=lora.preconditioner,
        damping=Damping(
            relative=lora.damping_for(config.optimizer.name),
            absolute=lora.precondition_damping_floor,
        ),
        beta2=lora.adaprelora_beta2,
        probes=lora.adaprelora_probes,
        statistics_every=lora.adaprelora_statistics_every,
        seed=config.training.seed,
    )


def attach_preconditioner(
    *,
    config: TrainConfig,
    network: LoRANetwork,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
) -> LoRAPreconditioner | None:
    """The preconditioner hooked before `optimizer.step()`, or None when the config has it off.

    `optimizer` is the torch optimizer itself, not accelerate's wrapper: the wrapper's step runs
    even when the fp16 scaler then skips the update. Prints which layers it serves; a warning
    names trainable tensors it leaves alone, and an error stops the run when it would serve
    nothing at all.
    """
    if config.lora.preconditioner == "none":
        return None
    settings = settings_from(config)
    coverage = find_coverage(network)
    if not coverage.adapters:
        raise UserError(
            f"lora.preconditioner is {config.lora.preconditioner!r} but no LoRA layer has both "
            f"factors trainable ({len(coverage.left_out)} tensors left out); set it to 'none' for "
            "these adapters"
        )
    summary = coverage.summary(settings.method)
    if accelerator.is_main_process:
        print(summary, flush=True)
    if coverage.left_out:
        log.warning(summary)
    scaler = accelerator.scaler
    one = torch.ones((), device=accelerator.device)
    preconditioner = LoRAPreconditioner(
        coverage.adapters,
        settings,
        # GradScaler.scale(1) is the scale as a tensor: get_scale() would wait for the GPU
        loss_scale=(lambda: scaler.scale(one)) if scaler is not None else lambda: None,
    )
    preconditioner.attach(optimizer)
    return preconditioner
