"""Advice on a config from what the benchmarks measured: `advice(config) -> list[str]`.

Each rule names a combination of settings that docs/benchmarks.md measured to go wrong (or never
measured), says what happened there and what to change. The trainer prints the lines when a run
starts and the GUI can show them; they never change the config. The numbers in the rules come
from `scripts/benchmark_convergence.py` (section "Convergence") and `scripts/benchmark_damping.py`
("Preconditioner damping by optimizer"); rerun the convergence benchmark when a rule's
evidence changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from modules.config.lora_schema import DEFAULT_DAMPING
from modules.config.schema import TrainConfig

ADAM_TYPE = ("adamw", "adamw_8bit", "prodigy")
MEASURED_OPTIMIZERS = ("adamw", "sgd", "prodigy")  # in the convergence benchmark
# SGD + Riemannian with momentum 0.9: the largest grid learning rate that converged in both
# experiments (the next, 1, diverged on every E1 problem and on E2 at rank 32)
SGD_PRECONDITIONED_MAX_LR = 0.316
# SGD + Riemannian: damping measured best with SGD, its default (the damping table)
SGD_DAMPING = DEFAULT_DAMPING["sgd"]


@dataclass(frozen=True)
class Rule:
    applies: Callable[[TrainConfig], bool]
    message: Callable[[TrainConfig], str]


def _preconditioned(config: TrainConfig) -> bool:
    return config.lora.preconditioner != "none"


RULES = [
    Rule(
        applies=lambda c: (
            _preconditioned(c)
            and c.optimizer.name == "sgd"
            and c.optimizer.momentum > 0
            and c.optimizer.learning_rate > SGD_PRECONDITIONED_MAX_LR
        ),
        message=lambda c: (
            f"optimizer.learning_rate {c.optimizer.learning_rate:g} with SGD (momentum "
            f"{c.optimizer.momentum:g}) and lora.preconditioner {c.lora.preconditioner!r} is above "
            f"the largest rate that converged in docs/benchmarks.md ({SGD_PRECONDITIONED_MAX_LR:g}); "
            "larger ones diverged. Lower the learning rate or the momentum"
        ),
    ),
    Rule(
        applies=lambda c: (
            _preconditioned(c)
            and c.optimizer.name == "sgd"
            and c.lora.damping_for("sgd") > 3 * SGD_DAMPING
        ),
        message=lambda c: (
            f"lora.precondition_damping {c.lora.damping_for('sgd'):g} with SGD: SGD converged "
            f"best at {SGD_DAMPING:g} in docs/benchmarks.md (larger damping brings back the "
            "slowdown on ill-conditioned layers)"
        ),
    ),
    Rule(
        applies=lambda c: _preconditioned(c) and c.optimizer.name not in MEASURED_OPTIMIZERS,
        message=lambda c: (
            f"lora.preconditioner {c.lora.preconditioner!r} with optimizer {c.optimizer.name!r} "
            f"has not been measured (docs/benchmarks.md covers {', '.join(MEASURED_OPTIMIZERS)}); "
            "it runs, but watch the loss against a run without it"
        ),
    ),
]


def advice(config: TrainConfig) -> list[str]:
    """One line per measured pitfall the config runs into; empty when none applies."""
    return [rule.message(config) for rule in RULES if rule.applies(config)]
