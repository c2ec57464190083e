"""The latent and text caches: encoded once, re-encoded when a file changes, rebuilt when broken."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.data.demo_dataset import write_demo_dataset
from modules.models.registry import get_family
from modules.training.trainer import TrainingRun
from tests.data_helpers import write_image
from tests.helpers import TinyModel


@pytest.fixture
def encodes(tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of images per VAE encode call, from the moment the fixture is requested."""
    calls: list[int] = []
    family_class = type(get_family(tiny_model.family))
    real = family_class.encode_latents

    def counting(self, model, pixels):
        calls.append(len(pixels))
        return real(self, model, pixels)

    monkeypatch.setattr(family_class, "encode_latents", counting)
    return calls


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_demo_dataset(tmp_path / "data", count=4, size=64)


def entries(workspace: Path, kind: str) -> list[Path]:
    return sorted((workspace / "cache" / kind).rglob("*.safetensors"))


def make_run(model: TinyModel, folder: Path, workspace: Path, **sections: dict) -> TrainingRun:
    sections.setdefault("training", {"max_steps": 2})
    return TrainingRun(load_config(raw=model.config(folder, workspace, **sections)))


def test_unchanged_dataset_is_never_encoded_twice(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path, encodes: list[int], caplog
) -> None:
    workspace = tmp_path / "ws"
    make_run(tiny_model, dataset, workspace).run()
    assert sum(encodes) == 4 and len(entries(workspace, "latents")) == 4
    assert len(entries(workspace, "text")) == 4  # four distinct captions

    encodes.clear()
    make_run(tiny_model, dataset, workspace).run()
    assert encodes == [], "a second run must train from the cache alone"

    write_image(dataset / "001.png", 64, 64, seed=5, caption="geodesic demo, a blue square")
    make_run(tiny_model, dataset, workspace)
    assert encodes == [1], "only the changed file is encoded again"

    encodes.clear()
    victim = entries(workspace, "latents")[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a partial entry, as after a crash
    with caplog.at_level(logging.WARNING):
        make_run(tiny_model, dataset, workspace)
    assert encodes == [1]
    assert f"cache entry {victim} is unreadable" in caplog.text
    assert set(load_file(victim)) == {"mean", "std"}


def test_cache_key_covers_model_and_resolution(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path, encodes: list[int]
) -> None:
    shared = {"cache_dir": str(tmp_path / "shared-cache")}
    config = {"data": {"resolution": 64, "concepts": [{"path": str(dataset)}], **shared}}
    make_run(tiny_model, dataset, tmp_path / "a", **config)
    make_run(tiny_model, dataset, tmp_path / "b", **config)  # another run, same cache
    assert sum(encodes) == 4
    config["data"]["resolution"] = 128
    make_run(tiny_model, dataset, tmp_path / "c", **config)
    assert sum(encodes) == 8
    other = TinyModel(
        family=tiny_model.family,
        path=tiny_model.rebuilt(tmp_path / "other-model", seed=1),
        model=tiny_model.model,
    )
    make_run(other, dataset, tmp_path / "d", **config)
    assert sum(encodes) == 12


def test_flip_variants_are_cached_and_random_crop_encodes_live(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path, encodes: list[int]
) -> None:
    flipped = tmp_path / "flip"
    data = {"resolution": 64, "concepts": [{"path": str(dataset)}], "flip": True}
    make_run(tiny_model, dataset, flipped, data=data).run()
    assert sum(encodes) == 8 and len(entries(flipped, "latents")) == 8

    encodes.clear()
    cropped = tmp_path / "crop"
    data = {"resolution": 64, "concepts": [{"path": str(dataset)}], "crop": "random"}
    run = make_run(tiny_model, dataset, cropped, data=data)
    assert encodes == [] and entries(cropped, "latents") == []
    run.run()
    assert sum(encodes) == 4  # two steps of two images, encoded as they are drawn


def test_shuffled_captions_are_encoded_live(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path
) -> None:
    concept = {"path": str(dataset), "shuffle_tags": True}
    run = make_run(tiny_model, dataset, tmp_path, data={"concepts": [concept]})
    assert entries(tmp_path, "text") == []
    _, batch = run.dataset.load(0)
    assert batch.text is None and batch.latent_mean is not None


def test_cached_and_live_training_end_with_the_same_weights(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path
) -> None:
    weights = []
    for name, cache in (("cached", True), ("live", False)):
        data = {"concepts": [{"path": str(dataset)}], "resolution": 64}
        data |= {"cache_latents": cache, "cache_text_embeddings": cache}
        output = {"workspace_dir": str(tmp_path / name), "name": "test-lora"}
        output["save_dtype"] = "float32"
        make_run(tiny_model, dataset, tmp_path / name, data=data, output=output).run()
        weights.append(load_file(tmp_path / name / "test-lora.safetensors"))
    cached, live = weights
    assert cached.keys() == live.keys()
    # equal up to float rounding (batched vs per-step encodes), far below one step's change (1e-3)
    for key in cached:
        torch.testing.assert_close(cached[key], live[key], rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize(
    ("data", "offloaded"),
    [
        ({}, {"vae", "te1", "te2"}),
        ({"crop": "random"}, {"te1", "te2"}),
        ({"offload_encoders": False}, set()),
    ],
)
def test_encoders_leave_the_gpu_once_everything_is_cached(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path, data: dict, offloaded: set
) -> None:
    """Which encoders are moved to CPU memory (decided as on a GPU; the move itself is a no-op)."""
    import contextlib
    from types import SimpleNamespace

    from modules.data.caching import build_caches

    data = {"concepts": [{"path": str(dataset)}], "resolution": 64, **data}
    run = make_run(tiny_model, dataset, tmp_path, data=data)
    gpu = SimpleNamespace(
        device=torch.device("cuda"),
        process_index=0,
        num_processes=1,
        is_local_main_process=True,
        wait_for_everyone=lambda: None,
        autocast=contextlib.nullcontext,
    )
    placement = build_caches(
        [run.dataset.train_loader],
        family=run.family,
        model=run.base,
        accelerator=gpu,
        batch_size=2,
        workers=0,
        offload=run.config.data.offload_encoders,
        text_trained=False,
    )
    names = {id(run.base.vae): "vae", id(run.base.text_encoder): "te1"}
    names[id(run.base.text_encoder_2)] = "te2"
    assert {names[id(m)] for m in placement.modules} == offloaded


def test_text_cache_key_covers_flux_t5_length(
    tiny_flux_path: Path, dataset: Path, tmp_path: Path
) -> None:
    """T5's output depends on the length it pads to: another length is another cache entry."""
    for length in (16, 16, 24):
        settings = {"family": "flux", "t5_max_length": length}
        make_run(TinyModel("flux", tiny_flux_path, settings), dataset, tmp_path)
    shapes = {tuple(load_file(entry)["prompt_embeds"].shape) for entry in entries(tmp_path, "text")}
    assert len(entries(tmp_path, "text")) == 8 and shapes == {(16, 32), (24, 32)}


def test_training_from_the_caches_never_runs_the_encoders(
    tiny_model: TinyModel, dataset: Path, tmp_path: Path
) -> None:
    """What offloading relies on: once everything is cached, a step needs no VAE and no text
    encoder (here they hold no weights at all: any use of them would fail)."""
    run = make_run(tiny_model, dataset, tmp_path, data={"concepts": [{"path": str(dataset)}]})
    for module in [run.family.latent_encoder(run.base), *run.family.text_encoders(run.base)]:
        module.to("meta")
    result = run.run()
    assert result.steps == 2
    assert all(torch.isfinite(v).all() for v in load_file(result.paths.output).values())
