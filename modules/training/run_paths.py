"""Where a run writes: its workspace, the LoRA, samples, logs and the end-of-run pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modules.config.schema import TrainConfig


@dataclass(frozen=True)
class RunPaths:
    workspace: Path
    output: Path
    samples: Path
    logs: Path
    comparison: Path  # sampling.before_after
    loss_curve: Path  # output.loss_curve

    @classmethod
    def from_config(cls, config: TrainConfig) -> RunPaths:
        workspace = Path(config.output.workspace_dir).expanduser()
        default_output = workspace / f"{config.output.name}.safetensors"
        return cls(
            workspace=workspace,
            output=Path(config.output.output_path or default_output).expanduser(),
            samples=workspace / "samples",
            logs=workspace / "logs",
            comparison=workspace / "samples" / "before_after.png",
            loss_curve=workspace / "loss.png",
        )
