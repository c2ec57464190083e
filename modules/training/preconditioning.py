"""Wire the LoRA preconditioner into a run from the config: settings, coverage report, hook."""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator

from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.lora.network import LoRANetwork
from modules.lora.preconditioning.coverage import find_coverage
from modules.lora.preconditioning.linalg import Damping
from modules.lora.preconditioning.preconditioner import LoRAPreconditioner, PreconditionerSettings

log = logging.getLogger(__name__)


def settings_from(config: TrainConfig) -> PreconditionerSettings:
    lora = config.lora
    return PreconditionerSettings(
        method=lora.preconditioner,
        damping=Damping(
            relative=lora.precondition_damping, absolute=lora.precondition_damping_floor
        ),
        beta2=lora.adaprelora_beta2,
        sketch_size=lora.adaprelora_probes,
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

    Prints which layers it serves; a warning names trainable tensors it leaves alone, and an error
    stops the run when it would serve nothing at all.
    """
    if config.lora.preconditioner == "none":
        return None
    settings = settings_from(config)
    coverage = find_coverage(
        network.named_parameters(),
        modules=network.modules(),
        part_of=network.part_of,
        needs_layer=settings.method == "adaprelora",
    )
    if not coverage.pairs:
        raise UserError(
            f"lora.preconditioner is {config.lora.preconditioner!r} but no trainable tensor is a "
            f"linked LoRA (A, B) pair ({len(coverage.left_out)} left out); set it to 'none' for "
            "these adapters"
        )
    summary = coverage.summary(settings.method)
    if accelerator.is_main_process:
        print(summary, flush=True)
    if coverage.left_out:
        log.warning(summary)
    scaler = accelerator.scaler
    preconditioner = LoRAPreconditioner(
        coverage.pairs,
        settings,
        # the tensor, not get_scale(): reading it on the host would stall the GPU every step
        loss_scale=(lambda: scaler._get_scale_async()) if scaler is not None else lambda: None,
    )
    preconditioner.attach(optimizer)
    return preconditioner
