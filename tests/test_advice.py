"""advice(config): the measured pitfalls a config runs into, one line each; and the defaults
that follow the same measurements (the damping by optimizer)."""

from __future__ import annotations

import pytest

from modules.config.advice import SGD_PRECONDITIONED_MAX_LR, advice
from modules.config.schema import TrainConfig
from modules.training.preconditioning import settings_from


def _config(**sections) -> TrainConfig:
    return TrainConfig.model_validate(sections)


@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"lora": {"preconditioner": "riemannian"}},
        {"lora": {"preconditioner": "adaprelora"}, "optimizer": {"name": "prodigy"}},
        {"optimizer": {"name": "sgd", "learning_rate": 10.0}},  # plain SGD: nothing measured to say
        {"lora": {"preconditioner": "riemannian"}, "optimizer": {"name": "sgd"}},  # its damping
        {
            "lora": {"preconditioner": "riemannian", "precondition_damping": 0.01},
            "optimizer": {"name": "sgd", "learning_rate": SGD_PRECONDITIONED_MAX_LR},
        },
    ],
)
def test_measured_settings_get_no_advice(sections):
    assert advice(_config(**sections)) == []


def test_sgd_with_the_preconditioner_above_the_measured_rate():
    lines = advice(
        _config(
            lora={"preconditioner": "riemannian", "precondition_damping": 0.01},
            optimizer={"name": "sgd", "learning_rate": 1.0},
        )
    )
    assert len(lines) == 1
    assert "learning_rate 1 with SGD (momentum 0.9)" in lines[0] and "diverged" in lines[0]


def test_sgd_without_momentum_is_not_held_to_the_momentum_limit():
    config = _config(
        lora={"preconditioner": "riemannian", "precondition_damping": 0.01},
        optimizer={"name": "sgd", "learning_rate": 1.0, "momentum": 0.0},
    )
    assert advice(config) == []


def test_unmeasured_optimizer_is_named():
    (line,) = advice(
        _config(lora={"preconditioner": "riemannian"}, optimizer={"name": "adafactor"})
    )
    assert "'adafactor' has not been measured" in line


def test_sgd_damping_advice():
    lines = advice(
        _config(
            lora={"preconditioner": "riemannian", "precondition_damping": 0.1},
            optimizer={"name": "sgd", "learning_rate": 0.1},
        )
    )
    assert len(lines) == 1 and "precondition_damping 0.1 with SGD" in lines[0]


@pytest.mark.parametrize(
    ("optimizer", "damping"), [("sgd", 0.01), ("adamw", 0.1), ("prodigy", 0.1), ("adafactor", 0.1)]
)
def test_an_empty_damping_is_the_one_measured_best_for_the_optimizer(optimizer, damping):
    config = _config(lora={"preconditioner": "riemannian"}, optimizer={"name": optimizer})
    assert config.lora.precondition_damping is None
    assert settings_from(config).damping.relative == damping


def test_a_set_damping_wins_over_the_optimizers_default():
    config = _config(
        lora={"preconditioner": "riemannian", "precondition_damping": 0.3},
        optimizer={"name": "sgd"},
    )
    assert settings_from(config).damping.relative == 0.3
