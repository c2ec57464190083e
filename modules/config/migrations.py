"""Upgrade saved configs from older versions, one step at a time.

Each migration takes the raw dict of version N and returns version N + 1. Never edit a migration
once released: add the next one.
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


MIGRATIONS: dict[int, Callable[[RawConfig], RawConfig]] = {1: _v1_to_v2}


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
        raw = MIGRATIONS[version](raw)
        version += 1
    raw["config_version"] = CONFIG_VERSION
    return raw
