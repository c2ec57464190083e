"""Older config files as a user brings them: migrated to the current version, errors named in the
current keys, newer or unknown versions refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import ConfigError, load_config
from modules.config.schema import CONFIG_VERSION
from tests.config_helpers import error_text, write_json


def test_v1_file_is_migrated(tmp_path: Path) -> None:
    v1 = write_json(
        tmp_path / "v1.json",
        {
            "config_version": 1,
            "lora": {"network_dim": 8, "network_alpha": 4},
            "training": {"learning_rate": 3e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 10},
        },
    )
    config = load_config(v1)
    assert config.config_version == CONFIG_VERSION
    assert config.lora.rank == 8
    assert config.lora.alpha == 4.0
    assert config.optimizer.learning_rate == 3e-4
    assert config.scheduler.name == "cosine"
    assert config.scheduler.warmup_steps == 10


def test_v1_migration_keeps_v2_keys_already_present() -> None:
    config = load_config(raw={"config_version": 1, "lora": {"network_dim": 8, "rank": 4}})
    assert config.lora.rank == 4


def test_v1_migration_errors_use_new_names() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(raw={"config_version": 1, "lora": {"network_dim": 2000}})
    assert str(info.value) == "config: lora.rank = 2000 is out of range; allowed: >= 1 and <= 1024"


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"riemannian_preconditioning": True}, "riemannian"),
        ({"riemannian_preconditioning": True, "preconditioner": "adaprelora"}, "adaprelora"),
        # v2 trained plainly whenever the switch was off, whatever the method said
        ({"riemannian_preconditioning": False, "preconditioner": "adaprelora"}, "none"),
        ({"preconditioner": "riemannian"}, "none"),
        ({}, "none"),
    ],
)
def test_v2_preconditioner_switch_becomes_one_field(lora: dict, expected: str) -> None:
    config = load_config(raw={"config_version": 2, "lora": lora})
    assert config.lora.preconditioner == expected


def test_v2_sdxl_config_gets_family_and_keeps_min_snr(tmp_path: Path) -> None:
    v2 = write_json(
        tmp_path / "v2.json",
        {
            "config_version": 2,
            "model": {"base_model": "models/sdxl", "unet": {"weight_dtype": "bfloat16"}},
            "training": {"min_snr_gamma": 5, "batch_size": 2},
        },
    )
    config = load_config(v2)
    assert config.model.family == "sdxl"
    assert config.model.min_snr_gamma == 5
    assert config.model.unet.weight_dtype == "bfloat16"
    assert config.training.batch_size == 2
    assert "min_snr_gamma" not in config.training.model_dump()


def test_v2_bad_switch_is_named_in_user_terms() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(raw={"config_version": 2, "lora": {"riemannian_preconditioning": "yes"}})
    assert str(info.value) == (
        "config: lora.riemannian_preconditioning = 'yes' must be true or false (config version "
        "2; newer configs set lora.preconditioner instead)"
    )


def test_family_sections_hold_their_own_parts() -> None:
    flux = load_config(raw={"model": {"family": "flux"}})
    assert list(flux.model.parts()) == ["transformer", "text_encoder", "text_encoder_2"]
    assert flux.model.trained_parts() == ["transformer"]
    with pytest.raises(ConfigError) as info:
        load_config(raw={"model": {"family": "flux", "unet": {"train": True}}})
    assert str(info.value).startswith("config: unknown key 'model.unet'")
    with pytest.raises(ConfigError) as info:
        load_config(raw={"model": {"family": "flux", "min_snr_gamma": 5}})
    assert str(info.value).startswith("config: unknown key 'model.min_snr_gamma'")
    with pytest.raises(ConfigError) as info:
        load_config(raw={"model": {"family": "flux", "text_encoder_2": {"train": True}}})
    assert "stays frozen" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(raw={"model": {"family": "sd15"}})
    assert str(info.value) == (
        "config: model.family = \"sd15\" is not allowed; choose one of 'sdxl', 'flux'"
    )


def test_newer_version_is_refused(tmp_path: Path) -> None:
    newer = CONFIG_VERSION + 1
    message = error_text(tmp_path / "new.json", {"config_version": newer})
    assert message == (
        f"config_version {newer} was written by a newer Geodesic "
        f"(this one reads up to {CONFIG_VERSION}); update Geodesic"
    )


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True, None])
def test_bad_version_is_refused(tmp_path: Path, version: Any) -> None:
    message = error_text(tmp_path / "v.json", {"config_version": version})
    assert message == f"config_version must be a positive integer, got {version!r}"


def test_missing_version_means_current(tmp_path: Path) -> None:
    # `rank` only exists in v2: read as v1 it would not be touched, read as v2 it is the rank.
    config = load_config(write_json(tmp_path / "c.json", {"lora": {"rank": 4}}))
    assert config.config_version == CONFIG_VERSION
    assert config.lora.rank == 4
    message = error_text(tmp_path / "d.json", {"lora": {"network_dim": 8}})
    assert message == "unknown key 'lora.network_dim'"
