"""What resuming does with settings changed since the backup: apply, warn, or refuse.

A backup carries the config it was written with. Before any model loads, the resumed config is
compared with it key by key, and each changed key takes the first matching rule below (the
README's resume table says the same). Settings the backup's state cannot serve (another
optimizer, another LoRA shape) are refused with one line naming the setting; settings that make
the rest of the run differ from an uninterrupted one are applied with a warning; the rest are
simply applied, and listed.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modules.config.loading import ConfigError, load_config
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.training.backup import Backup, open_backup

Action = Literal["refuse", "warn", "apply", "ignore"]


@dataclass(frozen=True)
class Rule:
    pattern: str  # a dotted key; * matches any part of it ("model.*.train", "data.*")
    action: Action
    why: str = ""
    when: Callable[[Any, Any], bool] = field(default=lambda old, new: True)


def _loraplus_toggled(old: Any, new: Any) -> bool:
    return (old == 1) != (new == 1)  # LoRA+ on or off splits or merges the optimizer's groups


_LAYERS = "the backup holds weights for other layers"
_ORDER = "the data order from here on differs from the run the backup came from"

RULES: tuple[Rule, ...] = (
    Rule("model.family", "refuse", "the backup is a LoRA of another model family"),
    Rule("model.*.train", "refuse", _LAYERS),
    Rule("lora.rank", "refuse", "the backup's weights have another shape"),
    Rule("lora.alpha", "refuse", "its weights were trained for another alpha / rank scale"),
    Rule("lora.layer_preset", "refuse", _LAYERS),
    Rule("lora.layer_patterns", "refuse", _LAYERS),
    Rule("optimizer.name", "refuse", "the backup holds another optimizer's state"),
    Rule(
        "lora.preconditioner",
        "refuse",
        "the optimizer's moments were built by another update rule",
    ),
    Rule(
        "lora.loraplus_ratio",
        "refuse",
        "LoRA+ on or off changes the optimizer's parameter groups",
        when=_loraplus_toggled,
    ),
    Rule("lora.init_from", "ignore", "the backup's weights are the starting point"),
    Rule("model.base_model", "warn", "the LoRA goes on training on another base model"),
    Rule(
        "model.single_file_config",
        "warn",
        "the parts a single-file checkpoint lacks may come from another model",
    ),
    Rule("training.seed", "warn", "noise and data order from here on differ"),
    Rule("training.batch_size", "warn", f"batches and epochs change; {_ORDER}"),
    Rule("training.gradient_accumulation_steps", "warn", "the effective batch changes"),
    Rule("data.validation.*", "apply"),
    Rule("data.workers", "apply"),
    Rule("data.cache*", "apply"),
    Rule("data.offload_encoders", "apply"),
    Rule("data.*", "warn", _ORDER),
    Rule("*", "apply"),
)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    rule: Rule

    def describe(self) -> str:
        return f"{self.key} {_shown(self.old)} -> {_shown(self.new)}"


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a dumped config; lists of sections are indexed, other lists kept whole."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(flatten(child, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        flat = {}
        for index, child in enumerate(value):
            flat.update(flatten(child, f"{prefix}{index}."))
        return flat
    return {prefix[:-1]: value}


def changes(saved: TrainConfig, current: TrainConfig) -> list[Change]:
    """Every key whose value differs, with the rule it falls under."""
    old = flatten(saved.model_dump(mode="json"))
    new = flatten(current.model_dump(mode="json"))
    missing = object()
    found = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, missing), new.get(key, missing)
        if before == after:
            continue
        before = None if before is missing else before
        after = None if after is missing else after
        rule = next(
            r for r in RULES if fnmatch.fnmatchcase(key, r.pattern) and r.when(before, after)
        )
        found.append(Change(key, before, after, rule))
    return found


@dataclass(frozen=True)
class ResumePlan:
    """What resuming will do, as lines for the user (refusals were raised already)."""

    warnings: list[str]  # the rest of the run differs from an uninterrupted one
    notes: list[str]  # settings applied or ignored


def check_resume(
    *,
    backup: Path,
    saved_config_json: str,
    config: TrainConfig,
    saved_dataset: dict[str, Any] | None,
    dataset: dict[str, Any],
) -> ResumePlan:
    """Compare the resumed config (and the training images) with the backup's; UserError naming
    the first setting the backup cannot continue with."""
    try:
        saved = load_config(raw=json.loads(saved_config_json))
    except (ValueError, ConfigError) as error:
        first = str(error).splitlines()[0]
        raise UserError(
            f"backup {backup}: its config.json is not a valid config ({first})"
        ) from None
    found = changes(saved, config)
    # the most basic refusal first: another family explains every other key that changed with it
    refused = sorted(
        (c for c in found if c.rule.action == "refuse"), key=lambda c: RULES.index(c.rule)
    )
    if refused:
        first = refused[0]
        others = ", ".join(c.key for c in refused[1:])
        also = f" (also changed: {others})" if others else ""
        raise UserError(
            f"--resume {backup}: {first.key} is {_shown(first.new)} but the backup was trained "
            f"with {_shown(first.old)}: {first.rule.why}. Set it back to {_shown(first.old)}, "
            f"or start a new run without --resume{also}"
        )
    warnings = [
        f"resuming with {c.describe()}: {c.rule.why}" for c in found if c.rule.action == "warn"
    ]
    if saved_dataset is not None and saved_dataset != dataset:
        warnings.append(
            f"resuming on other training images ({saved_dataset.get('images')} in the backup's "
            f"run, {dataset['images']} now): {_ORDER}"
        )
    notes = [
        f"resuming with {c.key} changed; ignored: {c.rule.why}"
        for c in found
        if c.rule.action == "ignore"
    ]
    applied = [c.describe() for c in found if c.rule.action == "apply"]
    if applied:
        notes.append("resuming with changed settings, applied: " + ", ".join(applied))
    return ResumePlan(warnings=warnings, notes=notes)


def plan_resume(
    path: Path, *, config: TrainConfig, dataset: dict[str, Any]
) -> tuple[Backup, ResumePlan]:
    """Open the backup at `path` (its checksums verified) and check `config` against it."""
    backup = open_backup(path)
    plan = check_resume(
        backup=backup.path,
        saved_config_json=backup.config_json,
        config=config,
        saved_dataset=backup.dataset,
        dataset=dataset,
    )
    return backup, plan
