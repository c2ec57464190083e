"""Resumable backups: LoRA weights, optimizer/scheduler/scaler state, RNG streams and counters.

A backup is a folder written under a temporary name and renamed into place, so a crash mid-write
never leaves a backup that looks complete. Its manifest.json, written last, holds the SHA-256 of
every file: a file changed, cut short or damaged since it was written is named on resume instead
of being trained on, and this module is the one place that checks a backup before it is used.
Weights go through safetensors and the rest through `torch.load(weights_only=True)`: nothing in a
backup can run code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.optim.lr_scheduler import LambdaLR

from modules.errors import UserError
from modules.util.atomic import HashingFile, temp_dir, written_file

log = logging.getLogger(__name__)

BACKUP_PREFIX = "step-"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
WEIGHTS, OPTIMIZER, STATE, CONFIG = "lora.safetensors", "optimizer.pt", "state.pt", "config.json"


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


@dataclass(frozen=True)
class Backup:
    """A backup's content, read after its files matched their checksums."""

    path: Path
    config_json: str  # the config the run had when it wrote the backup
    dataset: dict[str, Any] | None  # the training images' fingerprint (scan.Dataset.fingerprint)
    weights: dict[str, torch.Tensor] = field(repr=False)
    optimizer_state: dict[str, Any] = field(repr=False)
    saved: dict[str, Any] = field(repr=False)  # state.pt: progress, scheduler, scaler, RNG, ...


def backups_dir(workspace: Path) -> Path:
    return workspace / "backups"


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding inf or NaN (one host sync: a LoRA lives on one device)."""
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite, strict=True) if not ok]


def write_backup(
    state: TrainingState,
    *,
    workspace: Path,
    config_json: str,
    dataset: dict[str, Any] | None,
    keep_last: int,
) -> Path:
    """Write `backups/step-NNNNNN` atomically and prune all but the newest `keep_last`.

    The caller makes sure the weights are finite: a backup is a promise that training can go on
    from it. A failed write raises WriteError and leaves the older backups as they were.
    """
    root = backups_dir(workspace)
    target = root / f"{BACKUP_PREFIX}{state.progress.step:06d}"
    tmp = temp_dir(root)
    try:
        weights = {k: v.detach().cpu() for k, v in state.network.state_dict().items()}
        training_state = {
            "progress": asdict(state.progress),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "preconditioner": (
                state.preconditioner.state_dict() if state.preconditioner is not None else None
            ),
        }
        writers: dict[str, Callable[[HashingFile], Any]] = {
            WEIGHTS: lambda f: f.write(safetensors.torch.save(weights)),
            OPTIMIZER: lambda f: torch.save(state.optimizer.state_dict(), f),
            STATE: lambda f: torch.save(training_state, f),
            CONFIG: lambda f: f.write(config_json.encode("utf-8")),
        }
        files = {}
        for name, write in writers.items():
            with written_file(tmp / name, shown=target / name) as handle:
                write(handle)
            files[name] = {"sha256": handle.sha256, "bytes": handle.size}
        manifest = {
            "version": MANIFEST_VERSION,
            "step": state.progress.step,
            "dataset": dataset,
            "files": files,
        }
        with written_file(tmp / MANIFEST, shown=target / MANIFEST) as handle:
            handle.write(json.dumps(manifest, indent=1).encode("utf-8"))
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
    return _backups_in(backups_dir(workspace))


def _backups_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(BACKUP_PREFIX))


def find_backup(workspace: Path, requested: str | None) -> Path:
    """The backup to resume from: the given folder, or the newest one in the workspace."""
    if requested:
        path = Path(requested).expanduser()
        if not (path / STATE).is_file():
            raise UserError(f"--resume {requested}: not a backup folder (no state.pt inside)")
        return path
    found = list_backups(workspace)
    if not found:
        raise UserError(f"--resume: no backups in {backups_dir(workspace)}; start without --resume")
    return found[-1]


class DamagedBackupError(UserError):
    """A backup that cannot be resumed; the message names the file and the way forward."""

    def __init__(self, path: Path, problem: str) -> None:
        older = [p for p in _backups_in(path.parent) if p.name < path.name]
        way = f"resume from an older one (--resume {older[-1]}) or " if older else ""
        super().__init__(f"backup {path}: {problem}; {way}start without --resume")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest with its files checked against their checksums; None for a backup written
    before backups had one."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        listed = {
            name: (str(e["sha256"]), int(e["bytes"])) for name, e in manifest["files"].items()
        }
    except FileNotFoundError:
        log.warning(
            "backup %s has no %s (an older version wrote it): its files are not checked "
            "against checksums",
            path,
            MANIFEST,
        )
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedBackupError(path, f"{MANIFEST} is damaged") from None
    for name in (WEIGHTS, OPTIMIZER, STATE, CONFIG):
        if name not in listed:
            raise DamagedBackupError(path, f"{MANIFEST} does not list {name}")
    for name, (sha256, size) in listed.items():
        try:
            actual = ((path / name).stat().st_size, _sha256(path / name))
        except FileNotFoundError:
            raise DamagedBackupError(path, f"{name} is missing") from None
        except OSError as error:
            reason = error.strerror or str(error)
            raise DamagedBackupError(path, f"{name} cannot be read ({reason})") from None
        if actual != (size, sha256):
            what = f"{actual[0]} bytes, written as {size}" if actual[0] != size else "changed"
            raise DamagedBackupError(path, f"{name} is damaged ({what}: checksum mismatch)")
    return manifest


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load(path: Path, name: str, loader: Callable[[Path], Any]) -> Any:
    try:
        return loader(path / name)
    except Exception as error:  # any parser failure means the same: the file is unusable
        raise DamagedBackupError(path, f"{name} cannot be read ({_first_line(error)})") from None


def _torch_load(file: Path) -> Any:
    return torch.load(file, weights_only=True, map_location="cpu")


def _read_text(file: Path) -> str:
    return file.read_text(encoding="utf-8")


def open_backup(path: Path) -> Backup:
    """Read the backup at `path`, its files checked against the manifest and parsed; a
    DamagedBackupError (a UserError) names the first file that is missing, changed or not what
    a backup holds. Runs before any model loads."""
    manifest = _read_manifest(path)
    weights = _load(path, WEIGHTS, safetensors.torch.load_file)
    optimizer_state = _load(path, OPTIMIZER, _torch_load)
    saved = _load(path, STATE, _torch_load)
    config_json = _load(path, CONFIG, _read_text)
    if not (
        isinstance(optimizer_state, dict) and {"state", "param_groups"} <= optimizer_state.keys()
    ):
        raise DamagedBackupError(path, f"{OPTIMIZER} does not hold an optimizer state")
    expected = {"progress", "scheduler", "scaler", "rng_cpu", "rng_cuda", "preconditioner"}
    if not (isinstance(saved, dict) and expected <= saved.keys()):
        raise DamagedBackupError(path, f"{STATE} does not hold a training state")
    bad = nonfinite_tensors(weights)
    if bad:
        raise DamagedBackupError(
            path, f"{WEIGHTS} holds inf/NaN in {len(bad)} of {len(weights)} tensors"
        )
    return Backup(
        path=path,
        config_json=config_json,
        dataset=manifest.get("dataset") if manifest else None,
        weights=weights,
        optimizer_state=optimizer_state,
        saved=saved,
    )


def read_backup(state: TrainingState, backup: Backup, *, settings: Collection[str]) -> None:
    """Restore `state` in place from an opened backup.

    The optimizer's state (its moments, and whatever it learns on its own such as Prodigy's
    step size) comes from the backup; its `settings` (the param-group keys the config sets) and
    the learning rates stay as configured now, so a changed learning rate applies from the
    resumed step on, at the scheduler's place in its schedule.
    """
    path, saved = backup.path, backup.saved
    try:
        state.network.load_state_dict(backup.weights)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UserError(f"backup {path} does not match this config's LoRA: {first}") from None
    configured = [dict(group) for group in state.optimizer.param_groups]
    try:
        state.optimizer.load_state_dict(backup.optimizer_state)
        _apply_settings(state, configured, settings=settings, scheduler_state=saved["scheduler"])
        if state.scaler is not None and saved["scaler"] is not None:
            state.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_cpu"])
        if torch.cuda.is_available() and saved["rng_cuda"]:
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
        if state.preconditioner is not None:
            state.preconditioner.load_state_dict(saved["preconditioner"])
        progress = Progress(**{f.name: int(saved["progress"][f.name]) for f in fields(Progress)})
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        problem = f"its state does not fit this run ({_first_line(error)})"
        raise DamagedBackupError(path, problem) from None
    state.progress.step = progress.step
    state.progress.micro_batches = progress.micro_batches
    state.progress.skipped_steps = progress.skipped_steps


def _apply_settings(
    state: TrainingState,
    configured: list[dict[str, Any]],
    *,
    settings: Collection[str],
    scheduler_state: dict[str, Any],
) -> None:
    """Back to the configured optimizer settings and base learning rates after loading the
    optimizer's state, with each group's learning rate recomputed where the schedule stands."""
    groups = state.optimizer.param_groups
    if len(groups) != len(configured):
        raise ValueError(f"{len(configured)} parameter groups now, {len(groups)} in the backup")
    for group, fresh in zip(groups, configured, strict=True):
        for key in settings:
            if key in fresh:
                group[key] = fresh[key]
    scheduler = state.scheduler
    scheduler.load_state_dict(scheduler_state)
    scheduler.base_lrs = [fresh["initial_lr"] for fresh in configured]
    for index, (group, base) in enumerate(zip(groups, scheduler.base_lrs, strict=True)):
        if isinstance(scheduler, LambdaLR):  # what its next step would compute, bit for bit
            group["lr"] = base * scheduler.lr_lambdas[index](scheduler.last_epoch)
        elif base != group["initial_lr"]:  # the same factor of the schedule on the new base
            group["lr"] = base * (group["lr"] / group["initial_lr"])
        group["initial_lr"] = base
