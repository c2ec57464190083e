"""Upgrade saved configs from older versions, one step at a time.

Each migration takes the raw dict of version N and returns version N + 1; a value it cannot
carry over is a ValueError that names the key. Never edit a migration once released: add the
next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modules.config.schema import CONFIG_VERSION
from modules.errors import UserError

RawConfig = dict[str, Any]


def _move(raw: RawConfig, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    source = raw
    for key in old[:-1]:
        source = source.get(key)
        if not isinstance(source, dict):
            return
    if old[-1] not in source:
        return
    target = raw
    for key in new[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            return  # leave the old key; validation then reports both keys in user terms
    target.setdefault(new[-1], source.pop(old[-1]))


def _v1_to_v2(raw: RawConfig) -> RawConfig:
    """v1 used kohya's network_dim/network_alpha names and kept the learning rate in training."""
    _move(raw, ("lora", "network_dim"), ("lora", "rank"))
    _move(raw, ("lora", "network_alpha"), ("lora", "alpha"))
    _move(raw, ("training", "learning_rate"), ("optimizer", "learning_rate"))
    _move(raw, ("training", "lr_scheduler"), ("scheduler", "name"))
    _move(raw, ("training", "lr_warmup_steps"), ("scheduler", "warmup_steps"))
    return raw


def _v2_to_v3(raw: RawConfig) -> RawConfig:
    """v3 made `model` the family's own section and gave the preconditioner one switch.

    - `model.family` is written out (v2 knew only SDXL), and min-SNR moved from `training` into
      SDXL's `model` section;
    - `lora.riemannian_preconditioning` (on/off) and `lora.preconditioner` (which method) became
      `lora.preconditioner` = none / riemannian / adaprelora. A v2 method with the switch off
      trained plainly, so it migrates to none.
    """
    model = raw.get("model")
    if model is None:
        model = raw["model"] = {}
    if isinstance(model, dict):
        model.setdefault("family", "sdxl")
        if model["family"] == "sdxl":
            _move(raw, ("training", "min_snr_gamma"), ("model", "min_snr_gamma"))
    lora = raw.get("lora")
    if isinstance(lora, dict) and "riemannian_preconditioning" in lora:
        switch = lora.pop("riemannian_preconditioning")
        if switch is True:
            lora.setdefault("preconditioner", "riemannian")
        elif switch is False:
            lora["preconditioner"] = "none"
        else:
            raise ValueError(
                f"lora.riemannian_preconditioning = {switch!r} must be true or false (config "
                "version 2; newer configs set lora.preconditioner instead)"
            )
    elif isinstance(lora, dict) and "preconditioner" in lora:
        lora["preconditioner"] = "none"  # v2 default of the switch: off
    return raw


MIGRATIONS: dict[int, Callable[[RawConfig], RawConfig]] = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(raw: RawConfig, *, source: str) -> RawConfig:
    """Bring `raw` to CONFIG_VERSION; a file without config_version is taken as current."""
    version = raw.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{source}: config_version must be a positive integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise UserError(
            f"{source}: config_version {version} was written by a newer Geodesic "
            f"(this one reads up to {CONFIG_VERSION}); update Geodesic"
        )
    while version < CONFIG_VERSION:
        try:
            raw = MIGRATIONS[version](raw)
        except ValueError as error:  # a value the migration cannot carry over
            raise UserError(f"{source}: {error}") from None
        version += 1
    raw["config_version"] = CONFIG_VERSION
    return raw
