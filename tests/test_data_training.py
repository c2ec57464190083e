"""The data pipeline inside real runs: buckets, bad files mid-run, masks, validation, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.data.demo_dataset import write_demo_dataset
from modules.models.losses import masked_mse
from modules.training.trainer import TrainingRun, train
from tests.data_helpers import write_image, write_truncated_png
from tests.helpers import TinyModel, run_cli, straight_and_resumed, tiny_config

# LoRA layers the default preset (attn-mlp) puts on each family's tiny model
LAYERS = {"sdxl": 48, "flux": 34}


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Six captioned images in three aspect ratios (square, landscape, portrait) at ~128 px."""
    folder = tmp_path / "mixed"
    sizes = [(128, 128), (160, 150), (256, 96), (240, 80), (96, 256), (80, 200)]
    for i, (w, h) in enumerate(sizes):
        write_image(folder / f"{i}.png", w, h, seed=i, caption=f"shape {i}, tag a, tag b")
    return folder


def test_bucketed_multi_resolution_run_from_the_cli(
    tiny_model: TinyModel, mixed_folder: Path, tmp_path: Path
) -> None:
    write_truncated_png(mixed_folder / "broken.png")
    raw = tiny_model.config(
        mixed_folder,
        tmp_path / "ws",
        data={
            "resolution": 128,
            "extra_resolutions": [64],
            "concepts": [{"path": str(mixed_folder), "trigger_word": "sks", "repeats": 2}],
            "flip": True,
        },
        training={"max_steps": 3, "batch_size": 2},
    )
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(preset))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "data: 6 images in 1 concept, 1 files skipped" in lines
    assert f"  data.concepts.0 {mixed_folder}: 6 images, 24 per epoch" in lines
    assert f"  skipped {mixed_folder / 'broken.png'}: truncated: image file is truncated" in lines
    assert "  buckets at 128 px: 64x192: 2, 128x128: 2, 192x64: 2" in lines
    assert "  buckets at 64 px: 64x64: 6" in lines
    layers = LAYERS[tiny_model.family]
    assert any(line.startswith(f"training {layers} LoRA layers for 3 steps") for line in lines)
    assert (tmp_path / "ws" / "test-lora.safetensors").is_file()


def test_every_micro_batch_is_one_bucket_with_its_time_ids(
    tiny_sdxl_path: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    data = {"resolution": 128, "concepts": [{"path": str(mixed_folder)}], "crop": "random"}
    run = TrainingRun(
        load_config(raw=tiny_config(tiny_sdxl_path, mixed_folder, tmp_path, data=data))
    )
    assert run.data.micro_per_epoch == 3
    shapes = set()
    for position in range(3):
        _, batch = run.dataset.load(position)
        height, width = batch.target_size
        assert batch.pixels.shape == (2, 3, height, width)  # random crop: encoded live
        shapes.add((height, width))
        for (orig_h, orig_w), (top, left) in zip(
            batch.original_sizes.tolist(), batch.crop_top_lefts.tolist(), strict=True
        ):
            assert orig_w / orig_h == pytest.approx(width / height, rel=0.5)
            assert top >= 0 and left >= 0
    assert shapes == {(128, 128), (64, 192), (192, 64)}


def test_workers_prefetch_the_same_batches(tiny_dataset_path: Path, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "m", tiny_dataset_path, tmp_path, training={"batch_size": 1})
    from modules.data.pipeline import DataPipeline

    pipeline = DataPipeline(load_config(raw=raw), latent_multiple=64)
    pipeline.shard(batch_size=1, seed=7, rank=0, world=1)
    pipeline.config.data.workers = 2
    with pipeline.stream(start=3) as batches:
        prefetched = [next(batches) for _ in range(6)]
    for offset, (epoch, batch) in enumerate(prefetched):
        expected_epoch, expected = pipeline.load(3 + offset)
        assert epoch == expected_epoch and batch.captions == expected.captions
        assert torch.equal(batch.pixels, expected.pixels)


def test_files_that_go_bad_mid_run_are_skipped_and_the_run_goes_on(
    tiny_model: TinyModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_demo_dataset(tmp_path / "data", count=4, size=64)
    data = {"concepts": [{"path": str(folder)}], "cache_latents": False, "workers": 0}
    raw = tiny_model.config(folder, tmp_path / "ws", data=data)
    run = TrainingRun(load_config(raw=raw | {"training": {"max_steps": 4, "batch_size": 2}}))
    (folder / "000.png").unlink()
    (folder / "001.png").write_text("replaced by something else", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        result = run.run()
    assert result.steps == 4 and not result.interrupted
    assert f"skipped {folder / '000.png'}: unreadable: the file is gone" in caplog.text
    assert f"skipped {folder / '001.png'}: unreadable: not an image file" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_file(result.paths.output).values())


def _validation_losses(logs: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("loss/validation")]


def test_validation_loss_is_logged_and_changes_nothing_in_training(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    held_out = write_demo_dataset(tmp_path / "held-out", count=2, size=64, seed=3)
    sections = {
        "training": {"max_steps": 4, "batch_size": 2},
        "lora": {"rank": 4, "alpha": 4, "dropout": 0.1},
        "output": {"save_dtype": "float32"},
    }
    plain = train(load_config(raw=tiny_model.config(tiny_dataset_path, tmp_path / "a", **sections)))
    validation = {"concepts": [{"path": str(held_out)}], "every_n_steps": 2}
    sections["data"] = {"concepts": [{"path": str(tiny_dataset_path)}], "validation": validation}
    validated = train(
        load_config(raw=tiny_model.config(tiny_dataset_path, tmp_path / "b", **sections))
    )
    a, b = load_file(plain.paths.output), load_file(validated.paths.output)
    assert all(torch.equal(a[k], b[k]) for k in a), "validation must not touch the training RNG"
    losses = _validation_losses(validated.paths.logs)
    assert [step for step, _ in losses] == [2, 4]
    assert all(0 < loss < 10 for _, loss in losses)


def test_masked_training_weights_the_loss_by_the_mask(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    folder = write_demo_dataset(tmp_path / "data", count=4, size=64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # train the left half only
    mask.save(folder / "000-mask.png")
    mask.save(folder / "002-mask.png")
    data = {"concepts": [{"path": str(folder)}], "masked_training": True, "unmasked_weight": 0}
    run = TrainingRun(load_config(raw=tiny_model.config(folder, tmp_path, data=data)))
    assert f"  data.concepts.0 {folder}: 4 images, 4 per epoch, 2 with masks" in (
        run.dataset.report_lines()
    )
    masked = [run.dataset.load(p)[1] for p in range(2)]
    masks = torch.cat([b.masks for b in masked])
    assert masks.shape == (4, 1, 64, 64)
    assert sorted(m.mean().item() for m in masks) == [0.5, 0.5, 1.0, 1.0]

    prediction, target = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    target[..., 4:] = 1.0  # all the error in the right half
    half = torch.zeros(1, 1, 64, 64)
    half[..., :32] = 1
    assert masked_mse(prediction, target, half, unmasked=0.0).item() == 0.0
    assert masked_mse(prediction, target, half, unmasked=1.0).item() == pytest.approx(0.5)
    assert masked_mse(prediction, target, None, unmasked=0.0).item() == pytest.approx(0.5)
    assert masked_mse(prediction, target, half, unmasked=0.5).item() == pytest.approx(1 / 3)
    assert run.run().steps == 4


def test_a_dataset_without_usable_images_exits_2_before_loading_the_model(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    raw = tiny_config(tmp_path / "no-model-needed", folder, tmp_path / "ws")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(preset))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data.concepts.0.path: no usable image (.bmp, .jpeg, .jpg, .png, .webp) in "
        f"'{folder}' (1 skipped: a.jpg: empty file (0 bytes))"
    )


@pytest.mark.usefixtures("deterministic_kernels")
def test_resume_is_exact_with_buckets_and_augmentations(
    tiny_model: TinyModel, mixed_folder: Path, tmp_path: Path
) -> None:
    """Crops, flips, tag shuffles and fractional repeats come from (seed, position) alone."""
    concept = {"path": str(mixed_folder), "shuffle_tags": True, "caption_dropout": 0.3}
    sections = {
        "data": {
            "resolution": 128,
            "concepts": [concept | {"repeats": 0.5}, concept | {"trigger_word": "sks"}],
            "crop": "random",
            "flip": True,
        },
        "training": {"max_steps": 5, "batch_size": 2},
        "lora": {"rank": 4, "alpha": 4, "dropout": 0.1},
        "output": {"save_dtype": "float32"},
    }
    a, b = straight_and_resumed(
        lambda workspace: load_config(raw=tiny_model.config(mixed_folder, workspace, **sections)),
        tmp_path,
        stop_at=2,
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
