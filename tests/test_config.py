"""The training config as a user meets it: defaults, presets, --set, error messages, saving;
migrations of older files are in test_config_migrations.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from modules.config.fields import Section
from modules.config.loading import (
    ConfigError,
    config_to_json,
    load_config,
    parse_override,
    save_config,
)
from modules.config.schema import CONFIG_VERSION, TrainConfig
from modules.errors import UserError
from modules.models.registry import FAMILIES
from tests.config_helpers import config_error, error_text, write_json

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "training_presets").glob("*.json"))


# -- defaults and presets -----------------------------------------------------------------------


def test_defaults_are_one_config() -> None:
    config = load_config(raw={})
    assert config == TrainConfig()
    assert config.config_version == CONFIG_VERSION
    assert config.lora.rank == 16
    assert config.lora.alpha == 16.0
    assert config.lora.layer_preset == "attn-mlp"
    assert config.optimizer.name == "adamw"
    assert config.optimizer.learning_rate == 1e-4
    assert config.model.unet.train is True
    assert config.model.text_encoder.train is False
    assert config.model.text_encoder_2.train is False
    assert config.data.resolution == 1024
    assert config.output.format == "kohya"


def test_sparse_preset_is_merged_over_defaults(tmp_path: Path) -> None:
    preset = write_json(
        tmp_path / "preset.json",
        {
            "lora": {"rank": 32},
            "model": {"text_encoder": {"train": True, "learning_rate": 5e-5}},
            "data": {"concepts": [{"path": "images/dog", "repeats": 3}]},
        },
    )
    config = load_config(preset)
    assert config.lora.rank == 32
    assert config.lora.alpha == 16.0  # untouched keys of a touched section keep their default
    assert config.model.text_encoder.train is True
    assert config.model.text_encoder.learning_rate == 5e-5
    assert config.model.text_encoder_2.train is False
    assert config.data.concepts[0].path == "images/dog"
    assert config.data.concepts[0].repeats == 3
    assert config.optimizer == TrainConfig().optimizer


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_shipped_preset_loads(preset: Path) -> None:
    config = load_config(preset)
    assert config.config_version == CONFIG_VERSION
    assert json.loads(preset.read_text(encoding="utf-8")).get("config_version", CONFIG_VERSION) == (
        CONFIG_VERSION
    ), "presets should be saved at the current config_version"


def test_raw_dict_is_not_modified_by_loading() -> None:
    raw = {"config_version": 1, "lora": {"network_dim": 8}}
    load_config(raw=raw, overrides=["lora.alpha=2"])
    assert raw == {"config_version": 1, "lora": {"network_dim": 8}}


# -- --set overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("training.batch_size=2", ["training", "batch_size"], 2),
        ("optimizer.learning_rate=3e-4", ["optimizer", "learning_rate"], 3e-4),
        ("training.gradient_checkpointing=true", ["training", "gradient_checkpointing"], True),
        ('sampling.prompts=["a cat", "a dog"]', ["sampling", "prompts"], ["a cat", "a dog"]),
        ("output.name=my lora", ["output", "name"], "my lora"),
        (" lora.rank = 8", ["lora", "rank"], 8),
        ('optimizer.extra_kwargs={"d_coef": 0.5}', ["optimizer", "extra_kwargs"], {"d_coef": 0.5}),
        # text fields keep what was typed even when it reads as JSON
        ("output.name=2024", ["output", "name"], "2024"),
        ("sampling.negative_prompt=true", ["sampling", "negative_prompt"], "true"),
        ('output.trigger_phrase="sks dog"', ["output", "trigger_phrase"], "sks dog"),
        ("model.base_model=a=b", ["model", "base_model"], "a=b"),
    ],
)
def test_parse_override(text: str, path: list[str], value: Any) -> None:
    assert parse_override(text) == (path, value)


def test_overrides_apply_over_file(tmp_path: Path) -> None:
    preset = write_json(tmp_path / "p.json", {"lora": {"rank": 32}, "training": {"batch_size": 4}})
    config = load_config(
        preset,
        overrides=[
            "lora.rank=8",
            "optimizer.learning_rate=3e-4",
            "training.gradient_checkpointing=true",
            'sampling.prompts=["a cat", "a dog"]',
            "output.name=my lora",
            "output.trigger_phrase=2024",
            "model.unet.learning_rate=5e-5",  # nested section absent from the file
        ],
    )
    assert config.lora.rank == 8
    assert config.training.batch_size == 4
    assert config.optimizer.learning_rate == 3e-4
    assert config.training.gradient_checkpointing is True
    assert config.sampling.prompts == ["a cat", "a dog"]
    assert config.output.name == "my lora"
    assert config.output.trigger_phrase == "2024"
    assert config.model.unet.learning_rate == 5e-5
    assert config.model.unet.train is True


def test_later_override_wins() -> None:
    assert load_config(overrides=["lora.rank=8", "lora.rank=4"]).lora.rank == 4


@pytest.mark.parametrize("text", ["training.batch_size", "=2", "  =2", ""])
def test_bad_override_syntax(text: str) -> None:
    with pytest.raises(
        ConfigError, match=r"expected KEY=VALUE, e\.g\. --set training\.batch_size=2"
    ):
        load_config(overrides=[text])


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    preset = write_json(tmp_path / "p.json", {"training": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"training\.batch_size\.x: training\.batch_size is not"):
        load_config(preset, overrides=["training.batch_size.x=1"])


def test_bad_override_value_names_the_key(tmp_path: Path) -> None:
    preset = write_json(tmp_path / "p.json", {})
    error = config_error(preset, overrides=["lora.rank=0", "training.batchsize=2"])
    assert str(error).splitlines() == [
        f"{preset}: lora.rank = 0 is out of range; allowed: >= 1 and <= 1024",
        f"{preset}: unknown key 'training.batchsize' (did you mean 'training.batch_size'?)",
    ]


# -- error messages -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {"training": {"batchsize": 2}},
            "unknown key 'training.batchsize' (did you mean 'training.batch_size'?)",
            id="unknown-key",
        ),
        pytest.param(
            {"trainig": {}},
            "unknown key 'trainig' (did you mean 'training'?)",
            id="unknown-section",
        ),
        pytest.param(
            {"model": {"unet": {"lr": 1e-4}}},
            "unknown key 'model.unet.lr'",
            id="unknown-key-no-suggestion",
        ),
        pytest.param(
            {"training": {"intervals": 2}},
            "unknown key 'training.intervals'",
            id="unknown-key-starting-with-int",
        ),
        pytest.param(
            {"data": {"concepts": [{"path": "a"}, {"pth": "b"}]}},
            "unknown key 'data.concepts.1.pth' (did you mean 'data.concepts.1.path'?)",
            id="unknown-key-in-list-item",
        ),
        pytest.param(
            {"training": {"batch_size": "two"}},
            'training.batch_size = "two": Input should be a valid integer, unable to parse '
            "string as an integer",
            id="wrong-type",
        ),
        pytest.param(
            {"lora": 5},
            "lora must be a JSON object ({...}), got 5",
            id="section-not-object",
        ),
        pytest.param(
            {"lora": {"rank": 2000}},
            "lora.rank = 2000 is out of range; allowed: >= 1 and <= 1024",
            id="out-of-range",
        ),
        pytest.param(
            {"lora": {"dropout": 1}},
            "lora.dropout = 1 is out of range; allowed: >= 0 and < 1",
            id="out-of-range-exclusive",
        ),
        pytest.param(
            {"model": {"unet": {"learning_rate": -1}}},
            "model.unet.learning_rate = -1 is out of range; allowed: > 0",
            id="out-of-range-optional",
        ),
        pytest.param(
            {"data": {"resolution": 1000}},
            "data.resolution = 1000 is out of range; allowed: >= 64 and <= 4096 and multiple of 64",
            id="multiple-of",
        ),
        pytest.param(
            {"optimizer": {"name": "adamw8bit"}},
            "optimizer.name = \"adamw8bit\" is not allowed; choose one of 'adamw', 'adamw_8bit', "
            "'sgd', 'adafactor' or 'prodigy' (did you mean 'adamw_8bit'?)",
            id="literal",
        ),
        pytest.param(
            {"lora": {"layer_preset": "everything"}},
            "lora.layer_preset = \"everything\" is not allowed; choose one of 'attn', "
            "'attn-mlp' or 'full'",
            id="literal-no-suggestion",
        ),
        pytest.param(
            {"optimizer": {"betas": [0.9, 1.5]}},
            "optimizer.betas = [0.9, 1.5]: each beta must be in [0, 1), got 1.5",
            id="field-validator",
        ),
        pytest.param(
            {"output": {"name": ""}},
            'output.name = "": String should have at least 1 character',
            id="min-length",
        ),
        pytest.param(
            {"model": {"unet": {"train": False}}},
            "nothing to train: set model.unet.train, model.text_encoder.train or "
            "model.text_encoder_2.train to true",
            id="nothing-to-train",
        ),
    ],
)
def test_error_message(tmp_path: Path, raw: dict[str, Any], expected: str) -> None:
    assert error_text(tmp_path / "config.json", raw) == expected


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "c.json",
        {"lora": {"rank": 0}, "training": {"batchsize": 2}, "optimizer": {"name": "adam"}},
    )
    lines = str(config_error(path)).splitlines()
    assert len(lines) == 3
    assert any("lora.rank = 0 is out of range" in line for line in lines)
    assert any("unknown key 'training.batchsize'" in line for line in lines)
    assert any('optimizer.name = "adam" is not allowed' in line for line in lines)


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "lora": {\n    "rank": 8,\n  }\n}\n', encoding="utf-8")
    message = str(config_error(path))
    assert re.fullmatch(rf"{re.escape(str(path))}: invalid JSON at line 4 column 3: .+", message)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    assert str(config_error(path)) == f"{path}: config file not found"


@pytest.mark.parametrize(("content", "kind"), [("[1, 2]", "list"), ('"rank"', "str"), ("3", "int")])
def test_top_level_must_be_an_object(tmp_path: Path, content: str, kind: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content, encoding="utf-8")
    assert str(config_error(path)) == (f"{path}: the top level must be a JSON object, got {kind}")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert str(config_error(path)).startswith(f"{path}: cannot read config file: ")


def test_config_errors_are_user_errors() -> None:
    assert issubclass(ConfigError, UserError)
    assert ConfigError.exit_code == 2
    with pytest.raises(UserError) as info:
        load_config(raw={"config_version": CONFIG_VERSION + 1})
    assert isinstance(info.value, ConfigError)
    assert info.value.exit_code == 2


# -- save / load --------------------------------------------------------------------------------


def _custom_config() -> TrainConfig:
    return load_config(
        raw={
            "model": {"base_model": "models/sdxl", "text_encoder": {"train": True}},
            "lora": {"rank": 8, "alpha": 1.5, "dropout": 0.05, "layer_patterns": ["re:attn2"]},
            "optimizer": {
                "name": "prodigy",
                "learning_rate": 1.0,
                "betas": [0.9, 0.99],
                "extra_kwargs": {"d_coef": 0.5},
            },
            "data": {"concepts": [{"path": "a", "repeats": 2}, {"path": "b"}]},
            "sampling": {"prompts": ["a cat"], "cfg_scale": 4.5},
            "output": {"name": "cat", "trigger_phrase": "sks cat"},
        }
    )


def test_save_load_round_trip(tmp_path: Path) -> None:
    config = _custom_config()
    path = tmp_path / "sub" / "saved.json"
    save_config(config, path)
    assert load_config(path) == config
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["config_version"] == CONFIG_VERSION
    assert path.read_text(encoding="utf-8") == config_to_json(config)


def test_default_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "default.json"
    save_config(TrainConfig(), path)
    assert load_config(path) == TrainConfig()


# -- reference docs -----------------------------------------------------------------------------


@functools.cache
def _config_reference() -> Any:
    """scripts/config_reference.py as a module (scripts/ is not a package)."""
    name = "_geodesic_config_reference"
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_docs_match_schema() -> None:
    reference = _config_reference()
    docs = ROOT / "docs" / "config.md"
    assert docs.exists(), "run: python scripts/config_reference.py --write"
    assert docs.read_text(encoding="utf-8") == reference.render(), (
        "docs/config.md is out of date; run: python scripts/config_reference.py --write"
    )


def test_docs_cover_every_field() -> None:
    text = _config_reference().render()

    def keys(model: Any, prefix: str, family: str = "") -> list[str]:
        found = []
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                found += keys(annotation, f"{key}.", family)
            elif name == "model" and not prefix:  # one section per family
                for tag, (section, _) in FAMILIES.items():
                    found += keys(section, f"{key}.", f" ({tag})")
            else:
                found.append(key + family)
        return found

    for key in keys(TrainConfig, ""):
        heading = key.replace(" (", "` (", 1) if " (" in key else key + "`"
        assert f"### `{heading}" in text, key
    assert "### `data.concepts.<i>.path`" in text
    te_train = text.split("### `model.text_encoder.train` (sdxl)")[1].split("###")[0]
    assert "- Default: `false`" in te_train
    assert "Allowed: " in text.split("### `model.guidance` (flux)")[1].split("###")[0]
