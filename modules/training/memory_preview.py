"""The memory estimate for a config without loading its model: what the GUI shows next to the
settings, the same lines the trainer prints before its first step.

The base model's architecture comes from its config files alone (no weights are read); when
there are none to read (no base model set yet, a repo id offline and not cached, ...) the
estimate is made at the family's reference model's shapes and says so in its first line.
"""

from __future__ import annotations

import torch

from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.models.registry import get_family
from modules.training.memory import MemoryEstimate, device_memory_available, estimate_memory


def estimate_for_config(config: TrainConfig) -> tuple[MemoryEstimate, str]:
    """The estimate of a training step of `config` on the GPU, and where the model's shapes came
    from (a line for people). With CUDA here, the warning compares it with the free memory of
    the current GPU."""
    family = get_family(config.model.family)
    try:
        model = family.meta_model(config)
        source = f"model shapes from the config files of {config.model.base_model.strip()}"
    except UserError as error:
        model = family.meta_model(config, reference=True)
        source = f"model shapes of {family.reference_model} ({error})"
    profile = family.memory_profile(model, config)
    available = None
    if torch.cuda.is_available():
        available = device_memory_available(torch.device("cuda", torch.cuda.current_device()))
    return estimate_memory(profile, config, device="cuda", available=available), source


def memory_estimate_lines(config: TrainConfig) -> list[str]:
    """The estimate's lines for `config`, first the one saying where the model's shapes came
    from. Takes a few seconds at full size (the activation trace): call it off the UI thread.
    A model the estimate cannot handle gives one line saying why instead."""
    try:
        estimate, source = estimate_for_config(config)
    except (UserError, NotImplementedError, RuntimeError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [f"no memory estimate for this model: {reason}"]
    return [source, *estimate.lines()]
