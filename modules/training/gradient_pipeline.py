"""The one place that turns accumulated gradients into a parameter update.

Order, fixed here and nowhere else: accumulate micro-batches (with DDP all-reduce on the last one),
unscale (fp16), clip the raw gradients, the optimizer's step (with its pre-hooks), scheduler step,
zero grads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn


@dataclass(frozen=True)
class StepOutcome:
    loss: float  # mean micro-batch loss of the step
    grad_norm: float  # norm of the raw (unscaled, unclipped) gradients
    applied: bool  # False when the step was skipped (non-finite, or the fp16 scaler backed off)
    finite: bool


class GradientPipeline:
    def __init__(
        self,
        *,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        parameters: list[nn.Parameter],
        accumulation_steps: int,
        max_grad_norm: float,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.parameters = parameters
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._micro = 0

    @contextlib.contextmanager
    def micro_batch(self) -> Iterator[None]:
        """Context for one micro-batch's forward+backward; DDP syncs only on the step's last one."""
        last = self._micro + 1 == self.accumulation_steps
        context = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
        with context, self.accelerator.autocast():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self._loss_sum += loss.detach().float()
        self.accelerator.backward(loss / self.accumulation_steps)
        self._micro += 1

    @property
    def ready(self) -> bool:
        """True once the step's micro-batches are all accumulated."""
        return self._micro >= self.accumulation_steps

    def step(self) -> StepOutcome:
        """Unscale, clip, (pre-hooks) step, schedule, zero; one host sync for loss and norm.

        A non-finite loss or gradient is never applied; the trainer decides to stop or go on.
        """
        self.accelerator.unscale_gradients(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        loss_mean = self._loss_sum / self._micro
        loss_value, norm_value = torch.stack([loss_mean, grad_norm.to(loss_mean.device)]).tolist()
        # with fp16 loss scaling an inf gradient is routine: the scaler skips and backs off itself
        scaler_handles_norm = self.accelerator.scaler is not None
        finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler_handles_norm)
        applied = False
        if finite:
            self.optimizer.step()
            applied = not getattr(self.optimizer, "step_was_skipped", False)
            if applied:
                self.scheduler.step()
        self.optimizer.zero_grad()
        self._loss_sum.zero_()
        self._micro = 0
        return StepOutcome(loss=loss_value, grad_norm=norm_value, applied=applied, finite=finite)
