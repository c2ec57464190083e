"""Resumable backups: LoRA weights, optimizer/scheduler/scaler state, RNG streams and counters.

A backup is a folder written under a temporary name and renamed into place, so a crash mid-write
never leaves a backup that looks complete. Weights go through safetensors and the rest through
`torch.load(weights_only=True)`: nothing in a backup can run code when loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from modules.errors import UserError

BACKUP_PREFIX = "step-"


@dataclass
class Progress:
    """Where the run is; micro_batches fixes the position in the (seeded) data order."""

    step: int = 0
    micro_batches: int = 0
    skipped_steps: int = 0


@dataclass
class TrainingState:
    """Everything a backup restores, as live objects."""

    network: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress
    scaler: Any = None
    preconditioner: Any = None  # LoRAPreconditioner: AdaPreLoRA's moments must survive a resume


def backups_dir(workspace: Path) -> Path:
    return workspace / "backups"


def write_backup(
    state: TrainingState, *, workspace: Path, config_json: str, keep_last: int
) -> Path:
    """Write `backups/step-NNNNNN` atomically and prune all but the newest `keep_last`."""
    root = backups_dir(workspace)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{BACKUP_PREFIX}{state.progress.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        weights = {k: v.detach().cpu() for k, v in state.network.state_dict().items()}
        save_file(weights, tmp / "lora.safetensors")
        torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(
            {
                "progress": asdict(state.progress),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "preconditioner": (
                    state.preconditioner.state_dict() if state.preconditioner is not None else None
                ),
            },
            tmp / "state.pt",
        )
        (tmp / "config.json").write_text(config_json, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_backups(workspace)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_backups(workspace: Path) -> list[Path]:
    """Complete backups, oldest first."""
    root = backups_dir(workspace)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(BACKUP_PREFIX))


def find_backup(workspace: Path, requested: str | None) -> Path:
    """The backup to resume from: the given folder, or the newest one in the workspace."""
    if requested:
        path = Path(requested).expanduser()
        if not (path / "state.pt").is_file():
            raise UserError(f"--resume {requested}: not a backup folder (no state.pt inside)")
        return path
    found = list_backups(workspace)
    if not found:
        raise UserError(f"--resume: no backups in {backups_dir(workspace)}; start without --resume")
    return found[-1]


def read_backup(state: TrainingState, path: Path) -> None:
    """Restore `state` in place from the backup folder `path`."""
    try:
        weights = load_file(path / "lora.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        saved = torch.load(path / "state.pt", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise UserError(f"backup {path} cannot be read: {error}") from None
    try:
        state.network.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UserError(f"backup {path} does not match this config's LoRA: {first}") from None
    state.optimizer.load_state_dict(optimizer_state)
    state.scheduler.load_state_dict(saved["scheduler"])
    if state.scaler is not None and saved["scaler"] is not None:
        state.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_cpu"])
    if torch.cuda.is_available() and saved["rng_cuda"]:
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    if state.preconditioner is not None:
        if saved.get("preconditioner") is None:
            raise UserError(
                f"backup {path} was written with lora.preconditioner 'none'; resume it with the "
                "setting it was trained with"
            )
        try:
            state.preconditioner.load_state_dict(saved["preconditioner"])
        except ValueError as error:
            raise UserError(f"backup {path}: {error}") from None
    progress = Progress(**saved["progress"])
    state.progress.step = progress.step
    state.progress.micro_batches = progress.micro_batches
    state.progress.skipped_steps = progress.skipped_steps
