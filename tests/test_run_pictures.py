"""What a run leaves to look at: the before/after grid, the loss curve, and the advice it prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from modules.config.advice import advice
from modules.config.loading import load_config
from modules.config.schema import SamplingConfig, TrainConfig
from modules.models.registry import get_family
from modules.sampling.sampler import render_prompts
from modules.training.gradient_pipeline import StepOutcome
from modules.training.loss_curve import read_scalars
from modules.training.run_log import RunLog
from modules.training.trainer import TrainingRun, train
from tests.helpers import StopAtStep, run_cli, tiny_config

PROMPTS = ["a red circle", "a blue square"]


def _config(model: Path, data: Path, workspace: Path, **sections) -> TrainConfig:
    raw = tiny_config(
        model,
        data,
        workspace,
        optimizer={"learning_rate": 3e-2},
        sampling={"prompts": PROMPTS, "steps": 2, "at_end": False, "before_after": True},
        **sections,
    )
    return TrainConfig.model_validate(raw)


def _cells(grid: Image.Image, *, rows: int, columns: int, size: int = 64, gap: int = 4):
    """The grid's images, row by row (labels are on the left, images right-aligned)."""
    array = np.asarray(grid)
    left = grid.width - columns * (size + gap)
    return [
        [
            array[
                gap + row * (size + gap) : gap + row * (size + gap) + size,
                left + column * (size + gap) : left + column * (size + gap) + size,
            ]
            for column in range(columns)
        ]
        for row in range(rows)
    ]


def test_before_after_grid_shows_the_base_model_and_the_lora(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
):
    config = _config(tiny_sdxl_path, tiny_dataset_path, tmp_path / "ws")
    result = train(config)
    assert result.comparison == tmp_path / "ws" / "samples" / "before_after.png"
    grid = Image.open(result.comparison)
    (before, after) = _cells(grid, rows=2, columns=len(PROMPTS))
    # the top row is exactly what the base model alone draws with the same prompts and seeds
    family = get_family("sdxl")
    fresh = family.load(config)
    expected = render_prompts(family=family, base=fresh, config=config.sampling, resolution=64)
    for cell, image in zip(before, expected, strict=True):
        assert np.array_equal(cell, np.asarray(image))
    # and the LoRA changed what it draws
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def test_loss_curve_covers_a_resumed_run(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
):
    config = _config(tiny_sdxl_path, tiny_dataset_path, tmp_path / "ws")
    config.sampling.before_after = False
    config.data.validation.concepts = config.data.concepts
    config.data.validation.every_n_steps = 2
    run = TrainingRun(config)
    assert run.run(StopAtStep(run, 2)).interrupted
    result = train(config, resume_latest=True)
    assert result.loss_curve == tmp_path / "ws" / "loss.png"
    assert Image.open(result.loss_curve).format == "PNG"
    curves = read_scalars(result.paths.logs, ["loss/train", "loss/validation"])
    assert sorted(curves["loss/train"]) == [1, 2, 3, 4]
    assert sorted(curves["loss/validation"]) == [2, 4]
    assert all(np.isfinite(v) for v in curves["loss/train"].values())


def test_no_loss_curve_when_switched_off(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
):
    config = _config(tiny_sdxl_path, tiny_dataset_path, tmp_path / "ws")
    config.sampling.before_after = False
    config.output.loss_curve = False
    result = train(config)
    assert result.loss_curve is None and result.comparison is None
    assert not (tmp_path / "ws" / "loss.png").exists()


def test_the_cli_prints_advice_first_and_where_the_pictures_are(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
):
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path / "ws",
        lora={"rank": 4, "alpha": 4, "preconditioner": "riemannian"},
        optimizer={"name": "sgd", "learning_rate": 1.0},
        training={"max_steps": 1, "batch_size": 2, "on_nonfinite": "skip"},
        sampling={"prompts": ["a red circle"], "steps": 1, "at_end": False, "before_after": True},
    )
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(preset))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    advice_lines = [line for line in lines if line.startswith("advice: ")]
    assert advice_lines == [f"advice: {line}" for line in advice(load_config(preset))]
    assert any("learning_rate 1 with SGD" in line for line in advice_lines)
    training_line = next(i for i, line in enumerate(lines) if line.startswith("training "))
    assert lines.index(advice_lines[0]) < training_line
    assert f"before/after: {tmp_path / 'ws' / 'samples' / 'before_after.png'}" in lines
    assert f"loss curve: {tmp_path / 'ws' / 'loss.png'}" in lines


def test_render_prompts_leaves_the_training_rng_alone(tiny_sdxl_path: Path):
    config = TrainConfig.model_validate({"model": {"base_model": str(tiny_sdxl_path)}})
    family = get_family("sdxl")
    base = family.load(config)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sampling = SamplingConfig(prompts=["a red circle"], steps=1)
    render_prompts(family=family, base=base, config=sampling, resolution=64)
    assert torch.equal(torch.rand(3), expected)


def test_smoothed_loss_is_the_bias_corrected_average(tmp_path: Path):
    """The smoothed curve (progress bar, TensorBoard, loss.png, the GUI) weighs every step's loss
    by smoothing^age over the weights' sum, so a large first loss does not hold the curve up for
    dozens of steps."""
    losses = [0.09, 0.02, 0.01, 0.03, 0.02, 0.015]
    log = RunLog(
        logs_dir=tmp_path / "logs",
        total_steps=len(losses),
        initial_step=0,
        enabled=True,
        bar_factory=lambda **kw: tqdm(disable=True, **kw),
        smoothing=0.9,
    )
    for step, loss in enumerate(losses, start=1):
        outcome = StepOutcome(loss=loss, grad_norm=1.0, applied=True, finite=True)
        log.step(step=step, epoch=0, outcome=outcome, lrs={"lora": 1e-3}, skipped=0)
    log.close()
    logged = read_scalars(tmp_path / "logs", ["loss/train_smoothed"])["loss/train_smoothed"]
    for step in range(1, len(losses) + 1):
        ages = np.arange(step - 1, -1, -1, dtype=np.float64)
        weights = 0.9**ages
        expected = float((weights * np.array(losses[:step])).sum() / weights.sum())
        assert abs(logged[step] - expected) < 1e-6
    assert logged[2] < 0.06  # the plain EMA started at the first loss would read 0.083
