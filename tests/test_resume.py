"""Resume tells the truth: damaged backups are named, changed settings applied, warned or refused.

The backup comes from a real 2-step run; every resume that must fail is tried with a base model
that does not exist, so the test also proves it fails before any model loads.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.errors import UserError
from modules.training.backup import MANIFEST, open_backup
from modules.training.resume import changes
from modules.training.trainer import TrainingRun, train
from tests.helpers import TinyModel, tiny_config

SECTIONS = {
    "training": {"max_steps": 2, "batch_size": 2, "seed": 7},
    "scheduler": {"name": "cosine", "warmup_steps": 1},
    "backup": {"every_n_steps": 2},
    "data": {"workers": 0},
}


@pytest.fixture(scope="module")
def trained(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The workspace of a finished 2-step run with its backup at step 2."""
    workspace = tmp_path_factory.mktemp("trained")
    train(load_config(raw=tiny_config(tiny_sdxl_path, tiny_dataset_path, workspace, **SECTIONS)))
    assert (workspace / "backups" / "step-000002" / MANIFEST).is_file()
    return workspace


def _raw(model_path: Path, data_path: Path, workspace: Path, **changes: dict) -> dict:
    raw = tiny_config(model_path, data_path, workspace, **SECTIONS)
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace, and the path of its backup."""
    workspace = tmp_path / "ws"
    shutil.copytree(trained, workspace)
    return workspace / "backups" / "step-000002"


# -- damaged backups --------------------------------------------------------------------------


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(backup: Path) -> None:
        data = (backup / name).read_bytes()
        (backup / name).write_bytes(data[: len(data) // 2])

    return damage


def _flip_byte(name: str) -> Callable[[Path], None]:
    def damage(backup: Path) -> None:
        data = bytearray((backup / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (backup / name).write_bytes(bytes(data))

    return damage


def _without_manifest(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """A backup as older versions wrote them (no checksums), then damaged."""

    def both(backup: Path) -> None:
        (backup / MANIFEST).unlink()
        damage(backup)

    return both


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda backup: (backup / name).write_bytes(data)


def _torch_list(name: str) -> Callable[[Path], None]:
    return lambda backup: torch.save([1, 2, 3], backup / name)


DAMAGE = {
    "truncated optimizer.pt": (
        _truncate("optimizer.pt"),
        r"optimizer\.pt is damaged \(\d+ bytes, written as \d+: checksum mismatch\)",
    ),
    "a flipped bit in the weights": (
        _flip_byte("lora.safetensors"),
        r"lora\.safetensors is damaged \(changed: checksum mismatch\)",
    ),
    "missing optimizer.pt": (
        lambda backup: (backup / "optimizer.pt").unlink(),
        r"optimizer\.pt is missing",
    ),
    "garbled manifest": (_write(MANIFEST, b'{"files": 3'), r"manifest\.json is damaged"),
    "old backup, empty optimizer.pt": (
        _without_manifest(_write("optimizer.pt", b"")),
        r"optimizer\.pt cannot be read \(",
    ),
    "old backup, truncated state.pt": (
        _without_manifest(_truncate("state.pt")),
        r"state\.pt cannot be read \(",
    ),
    "old backup, state.pt not a dict": (
        _without_manifest(_torch_list("state.pt")),
        r"state\.pt does not hold a training state",
    ),
    "old backup, optimizer.pt not a dict": (
        _without_manifest(_torch_list("optimizer.pt")),
        r"optimizer\.pt does not hold an optimizer state",
    ),
    "old backup, truncated weights": (
        _without_manifest(_truncate("lora.safetensors")),
        r"lora\.safetensors cannot be read \(",
    ),
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_backup_is_named_before_the_model_loads(
    case: str, trained: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    damage, expected = DAMAGE[case]
    backup = _copy(trained, tmp_path)
    damage(backup)
    config = load_config(raw=_raw(tmp_path / "no-model", tiny_dataset_path, backup.parents[1]))
    with pytest.raises(UserError) as caught:
        TrainingRun(config, resume_latest=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"backup {backup}: ")
    assert message.endswith("; start without --resume")
    assert re.search(expected, message), message


def test_a_damaged_backup_points_to_the_older_one(
    trained: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    backup = _copy(trained, tmp_path)
    older = backup.with_name("step-000001")
    shutil.copytree(backup, older)
    _flip_byte("optimizer.pt")(backup)
    config = load_config(raw=_raw(tmp_path / "no-model", tiny_dataset_path, backup.parents[1]))
    with pytest.raises(UserError, match=rf"resume from an older one \(--resume {older}\) or"):
        TrainingRun(config, resume_latest=True)
    open_backup(older)  # and that one is whole


def test_a_backup_without_manifest_still_resumes_with_a_warning(
    trained: Path,
    tiny_sdxl_path: Path,
    tiny_dataset_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backup = _copy(trained, tmp_path)
    (backup / MANIFEST).unlink()
    config = load_config(raw=_raw(tiny_sdxl_path, tiny_dataset_path, backup.parents[1]))
    with caplog.at_level(logging.WARNING):
        run = TrainingRun(config, resume_latest=True)
    assert run.state.progress.step == 2
    assert f"backup {backup} has no manifest.json" in caplog.text


# -- changed settings -------------------------------------------------------------------------

REFUSED = {
    "optimizer.name": ({"optimizer": {"name": "sgd"}}, '"sgd"', '"adamw"'),
    "lora.rank": ({"lora": {"rank": 8}}, "8", "4"),
    "lora.alpha": ({"lora": {"alpha": 1.0}}, "1.0", "4.0"),
    "lora.layer_preset": ({"lora": {"layer_preset": "full"}}, '"full"', '"attn-mlp"'),
    "lora.preconditioner": ({"lora": {"preconditioner": "riemannian"}}, '"riemannian"', '"none"'),
    "lora.loraplus_ratio": ({"lora": {"loraplus_ratio": 16}}, "16.0", "1.0"),
    "model.text_encoder.train": ({"model": {"text_encoder": {"train": True}}}, "true", "false"),
}


@pytest.mark.parametrize("key", REFUSED, ids=list(REFUSED))
def test_settings_the_backup_cannot_continue_with_are_refused_by_name(
    key: str, trained: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Changing the optimizer used to crash with a KeyError mid-load; now one line says why."""
    changes, new, old = REFUSED[key]
    backup = _copy(trained, tmp_path)
    raw = _raw(tmp_path / "no-model", tiny_dataset_path, backup.parents[1], **changes)
    with pytest.raises(UserError) as caught:
        TrainingRun(load_config(raw=raw), resume_latest=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"--resume {backup}: {key} is {new} but the backup was trained with {old}: "
    )
    assert f"Set it back to {old}, or start a new run without --resume" in message


def test_settings_that_change_the_run_are_applied_with_a_warning(
    trained: Path,
    tiny_sdxl_path: Path,
    tiny_dataset_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backup = _copy(trained, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    shutil.copy(data / "000.png", data / "100.png")  # one image more
    raw = _raw(
        tiny_sdxl_path,
        data,
        backup.parents[1],
        training={"seed": 8, "batch_size": 1, "max_steps": 3},
        optimizer={"weight_decay": 0.05},
    )
    raw["data"]["concepts"][0]["repeats"] = 2
    with caplog.at_level(logging.INFO):
        result = train(load_config(raw=raw), resume_latest=True)
    assert result.steps == 3 and not result.interrupted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = [
        "resuming with data.concepts.0.path ",
        "resuming with data.concepts.0.repeats 1.0 -> 2.0: the data order from here on",
        "resuming with training.batch_size 2 -> 1: batches and epochs change",
        "resuming with training.seed 7 -> 8: noise and data order from here on differ",
        "resuming on other training images (4 in the backup's run, 5 now)",
    ]
    for start in expected:
        assert any(w.startswith(start) for w in warnings), (start, warnings)
    applied = next(
        r.getMessage() for r in caplog.records if "resuming with changed settings" in r.getMessage()
    )
    assert "optimizer.weight_decay 0.01 -> 0.05" in applied
    assert "training.max_steps 2 -> 3" in applied


def test_a_changed_learning_rate_applies_at_the_schedules_place(
    trained: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """It used to keep the old rate silently. Now the new base rate applies where the cosine
    schedule stands, and the optimizer's moments still come from the backup."""
    backup = _copy(trained, tmp_path)
    raw = _raw(
        tiny_sdxl_path,
        tiny_dataset_path,
        backup.parents[1],
        optimizer={"learning_rate": 3e-3, "betas": [0.8, 0.99]},
        training={"max_steps": 6},
    )
    run = TrainingRun(load_config(raw=raw), resume_latest=True)
    group = run.optimizer.param_groups[0]
    # reference: the same schedule, built fresh at 3e-3 and stepped twice
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([parameter], lr=3e-3)
    schedule = get_scheduler(
        "cosine", optimizer=reference, num_warmup_steps=1, num_training_steps=6
    )
    for _ in range(2):
        reference.step()
        schedule.step()
    assert group["lr"] == reference.param_groups[0]["lr"] != 3e-3
    assert group["initial_lr"] == 3e-3 and tuple(group["betas"]) == (0.8, 0.99)
    saved = torch.load(backup / "optimizer.pt", weights_only=True)
    state = run.optimizer.state_dict()["state"]
    assert torch.equal(state[0]["exp_avg"], saved["state"][0]["exp_avg"])
    weights = load_file(backup / "lora.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in run.network.state_dict().items())


RULES = {
    "optimizer.learning_rate=0.002": "apply",
    "model.unet.learning_rate=0.002": "apply",
    "optimizer.betas=[0.8, 0.9]": "apply",
    'optimizer.extra_kwargs={"foreach": false}': "apply",
    "scheduler.warmup_steps=10": "apply",
    "training.max_steps=100": "apply",
    "training.mixed_precision=bf16": "apply",
    "lora.dropout=0.1": "apply",
    "lora.loraplus_ratio=16": "refuse",
    "data.workers=0": "apply",
    "data.cache_latents=false": "apply",
    "data.validation.every_n_steps=5": "apply",
    "sampling.every_n_steps=5": "apply",
    "output.save_dtype=float32": "apply",
    "training.seed=1": "warn",
    "training.batch_size=3": "warn",
    "training.gradient_accumulation_steps=2": "warn",
    "data.resolution=128": "warn",
    "data.flip=true": "warn",
    "model.base_model=elsewhere": "warn",
    "optimizer.name=prodigy": "refuse",
    "lora.rank=8": "refuse",
    "lora.alpha=8": "refuse",
    'lora.layer_patterns=["attn1"]': "refuse",
    "model.text_encoder_2.train=true": "refuse",
    "lora.preconditioner=adaprelora": "refuse",
    "lora.init_from=other.safetensors": "ignore",
}


@pytest.mark.parametrize("override", RULES, ids=list(RULES))
def test_each_setting_takes_the_rule_the_readme_states(override: str) -> None:
    saved = load_config(raw={"lora": {"rank": 4, "alpha": 4}})
    current = load_config(raw={"lora": {"rank": 4, "alpha": 4}}, overrides=[override])
    found = changes(saved, current)
    assert len(found) == 1 and found[0].key.startswith(override.split("=")[0])
    assert found[0].rule.action == RULES[override]


def test_loraplus_changes_apply_while_it_stays_on() -> None:
    saved = load_config(raw={"lora": {"loraplus_ratio": 16}})
    current = load_config(raw={"lora": {"loraplus_ratio": 8}})
    assert [c.rule.action for c in changes(saved, current)] == ["apply"]


# -- the same rules on a Flux backup ----------------------------------------------------------
# Checksums and the rules are family-blind; these check that Flux's own keys (its parts, its
# options) fall under the rules the README states and that a Flux backup is checked like any.

FLUX_RULES = {
    "model.text_encoder.train=true": "refuse",
    "model.transformer.learning_rate=0.002": "apply",
    "model.guidance=3.0": "apply",
    "model.timestep_shift=fixed": "apply",
    "model.loss_weighting=cosmap": "apply",
    "model.t5_max_length=256": "apply",
    "model.quantize_base=int8": "apply",
    "model.offload_blocks=2": "apply",
    "model.base_model=elsewhere": "warn",
    "model.single_file_config=elsewhere": "warn",
}


@pytest.mark.parametrize("override", FLUX_RULES, ids=list(FLUX_RULES))
def test_each_flux_setting_takes_the_rule_the_readme_states(override: str) -> None:
    saved = load_config(raw={"model": {"family": "flux"}})
    current = load_config(raw={"model": {"family": "flux"}}, overrides=[override])
    found = changes(saved, current)
    assert len(found) == 1 and found[0].key == override.split("=")[0]
    assert found[0].rule.action == FLUX_RULES[override]


@pytest.fixture(scope="module")
def trained_flux(
    tiny_flux_path: Path, tiny_dataset_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The workspace of a finished 2-step Flux run with its backup at step 2."""
    from tests.conftest import FAMILY_SETTINGS

    workspace = tmp_path_factory.mktemp("trained-flux")
    model = TinyModel("flux", tiny_flux_path, FAMILY_SETTINGS["flux"])
    train(load_config(raw=model.config(tiny_dataset_path, workspace, **SECTIONS)))
    return workspace


def _flux_raw(model_path: Path, data_path: Path, workspace: Path, **changes: dict) -> dict:
    from tests.conftest import FAMILY_SETTINGS

    return TinyModel("flux", model_path, FAMILY_SETTINGS["flux"]).config(
        data_path, workspace, **{**SECTIONS, **changes}
    )


def test_a_flux_backup_resumes_with_a_changed_learning_rate(
    trained_flux: Path,
    tiny_flux_path: Path,
    tiny_dataset_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backup = _copy(trained_flux, tmp_path)
    raw = _flux_raw(
        tiny_flux_path,
        tiny_dataset_path,
        backup.parents[1],
        optimizer={"learning_rate": 3e-3},
        training={**SECTIONS["training"], "max_steps": 3},
    )
    with caplog.at_level(logging.INFO):
        result = train(load_config(raw=raw), resume_latest=True)
    assert result.steps == 3 and not result.interrupted
    assert "optimizer.learning_rate 0.001 -> 0.003" in caplog.text


def test_a_damaged_flux_backup_is_named(
    trained_flux: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    backup = _copy(trained_flux, tmp_path)
    _flip_byte("lora.safetensors")(backup)
    raw = _flux_raw(tmp_path / "no-model", tiny_dataset_path, backup.parents[1])
    with pytest.raises(UserError, match=r"lora\.safetensors is damaged \(changed: checksum"):
        TrainingRun(load_config(raw=raw), resume_latest=True)


def test_resuming_a_flux_backup_as_sdxl_names_the_family(
    trained_flux: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Every part's key changes with the family; the line names the family first, not a part
    or another refused setting that sorts before it."""
    backup = _copy(trained_flux, tmp_path)
    raw = _raw(tmp_path / "no-model", tiny_dataset_path, backup.parents[1], lora={"rank": 8})
    with pytest.raises(UserError) as caught:
        TrainingRun(load_config(raw=raw), resume_latest=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f'--resume {backup}: model.family is "sdxl" but the backup was trained with "flux": '
        "the backup is a LoRA of another model family."
    )
    assert "(also changed: model.transformer.train, model.unet.train, lora.rank)" in message
