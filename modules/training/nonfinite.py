"""What went non-finite, and the likely cause, in the words of the settings that change it.

A NaN is not always the learning rate's fault: before any update has been applied, the cause is
the starting point (a LoRA scale of alpha / rank far beyond usual, an `init_from` file, the base
model overflowing in float16); a LoRA that is finite in training but not in its save dtype has
outgrown that dtype. The messages say which, so the fix the user tries is the one that helps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from modules.config.schema import TrainConfig
from modules.errors import RunError
from modules.lora.formats import layout_of, network_dim
from modules.lora.network import LoRANetwork
from modules.util.dtypes import DTYPES

# alpha / rank beyond this is unusual (kohya's default is alpha <= rank, i.e. <= 1)
LARGE_SCALE = 16


def largest_magnitude(tensors: list[torch.Tensor]) -> float:
    finite = [t.detach().float().nan_to_num(0, 0, 0).abs().max() for t in tensors if t.numel()]
    return float(torch.stack(finite).max()) if finite else 0.0


def _where(last_backup: Path | None) -> str:
    return f"last good backup: {last_backup}" if last_backup else "no backup yet"


def lora_scale(network: LoRANetwork) -> float:
    """alpha / rank of most adapters, as the saved file states it (a continued file's own)."""
    rank, alpha = network_dim(network)
    return alpha / rank


def _scale_setting(config: TrainConfig) -> tuple[str, str]:
    """Where the LoRA's alpha / rank comes from, and what lowers it: a continued file brings its
    own ranks and alphas, which lora.alpha does not change."""
    if config.lora.init_from:
        return "alpha / rank of the lora.init_from file", "a file with a lower alpha"
    return "lora.alpha / lora.rank", "lower lora.alpha"


def _starting_point(config: TrainConfig, scale: float) -> str:
    """Suspects when nothing has been applied yet, most specific first."""
    suspects = []
    if scale > LARGE_SCALE:
        setting, fix = _scale_setting(config)
        suspects.append(
            f"{setting} = {scale:.3g} scales the LoRA's output and gradients far beyond usual "
            f"({fix})"
        )
    if config.lora.init_from:
        suspects.append(f"the starting weights from lora.init_from {config.lora.init_from}")
    halves = [
        f"model.{name}.weight_dtype"
        for name, part in config.model.parts().items()
        if part.weight_dtype == "float16"
    ]
    if config.training.mixed_precision == "fp16":
        halves.insert(0, "training.mixed_precision")
    if halves:
        suspects.append(f"the base model overflowing in float16 ({', '.join(halves)}; try bf16)")
    if not suspects:
        suspects.append("the base model or the training images")
    return "not the learning rate (no update has been applied yet): " + "; or ".join(suspects)


def step_message(
    *,
    config: TrainConfig,
    step: int,
    loss: float,
    grad_norm: float,
    updates_before: int,
    weights_finite: bool,
    last_backup: Path | None,
    scale: float,
) -> str:
    """The stop message for a step whose loss or gradient is not finite; `scale` is the LoRA's
    alpha / rank (`lora_scale`)."""
    what = "loss" if not torch.isfinite(torch.tensor(loss)) else "gradient"
    if not weights_finite:
        what = "LoRA weights"
    head = f"non-finite {what} at step {step} (loss={loss}, grad norm={grad_norm})"
    if updates_before == 0 and weights_finite:
        return f"{head}; {_starting_point(config, scale)}; {_where(last_backup)}"
    cause = (
        f"the updates grew too large: lower optimizer.learning_rate "
        f"({config.optimizer.learning_rate:g})"
    )
    if scale > LARGE_SCALE:
        setting, fix = _scale_setting(config)
        cause += f", or use {fix} ({setting} = {scale:.3g})"
    skip = (
        ""
        if what == "LoRA weights"
        else ", or set training.on_nonfinite=skip to step over rare bad batches"
    )
    return f"{head}; {cause}{skip}; {_where(last_backup)}"


def weights_message(*, step: int, config: TrainConfig, last_backup: Path | None) -> str:
    """The stop message when the LoRA's own weights hold inf or NaN (checked before a backup)."""
    return (
        f"the LoRA weights hold inf/NaN at step {step}, so no backup is written: the updates grew "
        f"too large (lower optimizer.learning_rate, {config.optimizer.learning_rate:g}); "
        f"{_where(last_backup)}"
    )


def save_message(
    *,
    path: Path,
    step: int,
    config: TrainConfig,
    bad: list[str],
    total: int,
    largest: float,
    last_backup: Path | None,
) -> str:
    """The stop message when the LoRA would be saved with inf or NaN in it; `largest` is the
    largest finite magnitude among the tensors before the cast to the save dtype."""
    dtype = config.output.save_dtype
    head = (
        f"not saving {path} at step {step}: {len(bad)} of {total} tensors would hold inf/NaN "
        f"in output.save_dtype {dtype} (e.g. {bad[0]})"
    )
    lower = f"lower optimizer.learning_rate ({config.optimizer.learning_rate:g})"
    if largest > torch.finfo(DTYPES[dtype]).max:
        cause = (
            f"the weights grew to |w| = {largest:.3g}, beyond {dtype}'s range and far beyond a "
            f"LoRA's usual size: {lower}"
        )
    else:
        cause = f"the weights went non-finite in training: {lower}"
    return f"{head}; {cause}; {_where(last_backup)}"


def check_saveable(
    network: LoRANetwork, *, path: Path, config: TrainConfig, step: int, last_backup: Path | None
) -> None:
    """RunError when the LoRA, as it would be written (after the cast to the save dtype), holds
    inf or NaN: a file like that breaks every image it is used for."""
    tensors = layout_of(network, config.output.format).encode(network, torch.float32)
    dtype = DTYPES[config.output.save_dtype]
    bad = [name for name, tensor in tensors.items() if not torch.isfinite(tensor.to(dtype)).all()]
    if bad:
        raise RunError(
            save_message(
                path=path,
                step=step,
                config=config,
                bad=bad,
                total=len(tensors),
                largest=largest_magnitude(list(tensors.values())),
                last_backup=last_backup,
            )
        )
