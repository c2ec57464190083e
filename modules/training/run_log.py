"""Progress bar and TensorBoard logging of a run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.training.gradient_pipeline import StepOutcome


class RunLog:
    """tqdm bar (step, epoch, smoothed loss, lr; s/it and ETA from tqdm) and TensorBoard scalars."""

    def __init__(
        self,
        *,
        logs_dir: Path,
        total_steps: int,
        initial_step: int,
        enabled: bool,
        bar_factory: Callable[..., Any],
        smoothing: float = 0.9,
    ) -> None:
        self.enabled = enabled
        self.smoothing = smoothing
        self.smoothed: float | None = None
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
            self.smoothed = (
                loss
                if self.smoothed is None
                else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
            )
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
