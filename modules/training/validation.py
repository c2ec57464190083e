"""Validation loss: the held-out concept scored at fixed timesteps with fixed noise.

Everything random is fixed (its own seeded generator, eval mode, the global RNG forked), so two
measurements differ only because the LoRA changed, and measuring never shifts the training RNG
streams: a run with validation ends with the same weights as one without.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from modules.config.schema import TrainConfig
from modules.data.pipeline import DataPipeline
from modules.models.base import ModelFamily


def validation_loss(
    *,
    family: ModelFamily,
    base: nn.Module,
    pipeline: DataPipeline,
    config: TrainConfig,
    accelerator: Accelerator,
) -> float | None:
    """Mean loss over the validation images and `data.validation.timesteps`; None without data."""
    batches = pipeline.validation_batches()
    if not batches:
        return None
    settings = config.data.validation
    generator = torch.Generator().manual_seed(settings.seed)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    total, count = 0.0, 0
    was_training = base.training
    with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
        base.eval()
        try:
            for batch in batches:
                for timestep in settings.timesteps:
                    loss = family.training_loss(
                        base,
                        batch,
                        generator=generator,
                        config=config,
                        timesteps=torch.full((len(batch),), timestep),
                    )
                    total += float(loss) * len(batch)
                    count += len(batch)
        finally:
            base.train(was_training)
    return total / count


class ValidationLog:
    """Writes `loss/validation` beside the training scalars (same TensorBoard run folder)."""

    def __init__(self, logs_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logs_dir), filename_suffix=".validation")

    def record(self, step: int, loss: float) -> None:
        self.writer.add_scalar("loss/validation", loss, step)
        self.writer.flush()
        tqdm.write(f"validation loss at step {step}: {loss:.4f}")

    def close(self) -> None:
        self.writer.close()
