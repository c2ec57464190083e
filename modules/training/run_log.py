"""Progress bar and TensorBoard logging of a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.training.events import EventSink, StepDone, ignore
from modules.training.gradient_pipeline import StepOutcome


class RunLog:
    """tqdm bar (step, epoch, smoothed loss, lr; s/it and ETA from tqdm), TensorBoard scalars, and
    the same figures as a StepDone event for a watcher (the GUI)."""

    def __init__(
        self,
        *,
        logs_dir: Path,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        bar_factory: Callable[..., Any],
        smoothing: float = 0.9,
        on_event: EventSink = ignore,
    ) -> None:
        self.enabled = enabled
        self.smoothing = smoothing
        self.smoothed: float | None = None
        # a zero-started average and its weight: their ratio is the bias-corrected EMA, so the
        # first losses (a random first timestep's loss can be several times the typical one)
        # weigh as much as later ones instead of anchoring the curve for dozens of steps
        self._average = 0.0
        self._weight = 0.0
        self.total_steps = total_steps
        self.on_event = on_event
        self.seconds_per_step: float | None = None
        self._last_step_at = time.monotonic()
        self.writer = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(logs_dir))
            self.bar = bar_factory(
                total=total_steps,
                initial=initial_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
            )

    def step(
        self, *, step: int, epoch: int, outcome: StepOutcome, lrs: dict[str, float], skipped: int
    ) -> None:
        if not self.enabled:
            return
        if outcome.finite:
            loss = outcome.loss
            self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
            self._weight = self.smoothing * self._weight + (1 - self.smoothing)
            self.smoothed = self._average / self._weight
            self.writer.add_scalar("loss/train", loss, step)
            self.writer.add_scalar("loss/train_smoothed", self.smoothed, step)
            self.writer.add_scalar("grad_norm", outcome.grad_norm, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        if skipped:
            self.writer.add_scalar("skipped_steps", skipped, step)
        first_lr = next(iter(lrs.values()))
        postfix = {
            "epoch": epoch + 1,
            "loss": f"{self.smoothed:.4f}" if self.smoothed is not None else "nan",
            "lr": f"{first_lr:.2e}",
        }
        if skipped:
            postfix["skipped"] = skipped
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        self._time_step()
        self.on_event(
            StepDone(
                step=step,
                total_steps=self.total_steps,
                epoch=epoch + 1,
                loss=outcome.loss if outcome.finite else None,
                smoothed_loss=self.smoothed,
                learning_rate=first_lr,
                seconds_per_step=self.seconds_per_step,
                eta_seconds=self.seconds_per_step * max(0, self.total_steps - step),
            )
        )

    def _time_step(self, weight: float = 0.3) -> None:
        """Exponentially smoothed seconds per step (the new step weighs `weight`, as in tqdm)."""
        now = time.monotonic()
        elapsed, self._last_step_at = now - self._last_step_at, now
        previous = self.seconds_per_step
        self.seconds_per_step = (
            elapsed if previous is None else weight * elapsed + (1 - weight) * previous
        )

    def close(self) -> None:
        """End the bar's line and flush the logs; safe to call twice."""
        if self.enabled and self.bar is not None:
            self.bar.close()
            self.writer.close()
            self.bar = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
