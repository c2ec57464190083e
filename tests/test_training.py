"""The training loop as a user meets it: loss falls, resume is exact, NaN is handled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.config.local_paths import shareable_config
from modules.errors import RunError, UserError
from modules.training.trainer import TrainingRun, train
from tests.helpers import StopAtStep, TinyModel, tiny_config

# What the saved files of each family's tiny model say about their base model
IDENTITY = {
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "flux": ("flux1", "flux-1-dev/lora"),
}


def test_lora_overfits_one_batch(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Same batch, noise and timesteps every step: the LoRA must fit it (loss at least halves)."""
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        lora={"rank": 8, "alpha": 8, "layer_preset": "full"},
        optimizer={"learning_rate": 3e-3, "weight_decay": 0.0},
        training={"batch_size": 2, "max_grad_norm": 0},
    )
    run = TrainingRun(load_config(raw=raw))
    _, batch = run.dataset.load(0)
    losses = []
    for _ in range(60):
        generator = torch.Generator().manual_seed(0)
        with run.pipeline.micro_batch():
            loss = run.model(batch, generator)
        run.pipeline.backward(loss)
        losses.append(run.pipeline.step().loss)
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses


def _final_weights(workspace: Path) -> dict[str, torch.Tensor]:
    return load_file(workspace / "test-lora.safetensors")


@pytest.mark.usefixtures("deterministic_kernels")
def test_resume_is_exact(tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path) -> None:
    """Stopped at step 3 and resumed ends with the same weights as an uninterrupted run."""
    sections = {
        "lora": {"rank": 4, "alpha": 2, "dropout": 0.1},
        "training": {"max_steps": 6, "batch_size": 1, "gradient_accumulation_steps": 2},
        "scheduler": {"name": "cosine", "warmup_steps": 2},
        "sampling": {"prompts": ["a red circle"], "every_n_steps": 2, "steps": 2, "at_end": False},
        "backup": {"every_n_steps": 0},
        "output": {"save_dtype": "float32"},
    }
    straight = tmp_path / "straight"
    train(load_config(raw=tiny_model.config(tiny_dataset_path, straight, **sections)))

    stopped = tmp_path / "stopped"
    config = load_config(raw=tiny_model.config(tiny_dataset_path, stopped, **sections))
    run = TrainingRun(config)
    result = run.run(StopAtStep(run, 3))
    assert result.interrupted and result.steps == 3
    assert result.last_backup == stopped / "backups" / "step-000003"
    assert not (stopped / "test-lora.safetensors").exists()

    resumed = train(config, resume_latest=True)
    assert resumed.steps == 6 and not resumed.interrupted
    a, b = _final_weights(straight), _final_weights(stopped)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-6
    assert any(a[k].abs().max() > 0 for k in a if k.endswith("lora_up.weight"))


def test_saved_lora_carries_resolved_config(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    config = load_config(
        raw=tiny_model.config(tiny_dataset_path, tmp_path),
        overrides=["training.max_steps=1"],
    )
    result = train(config)
    with safe_open(result.paths.output, "pt") as handle:
        metadata = handle.metadata()
    # the training settings travel with the file, the user's folders only in the workspace
    embedded = json.loads(metadata["geodesic.config"])
    assert embedded == shareable_config(config)
    assert embedded["data"]["concepts"][0]["path"] == embedded["model"]["base_model"] == ""
    assert embedded["lora"] == config.lora.model_dump(mode="json")
    for folder in (tiny_model.path, tiny_dataset_path, tmp_path):
        assert str(folder) not in json.dumps(metadata)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"]["concepts"][0]["path"] == str(tiny_dataset_path)
    assert metadata["ss_network_dim"] == "4"
    version, architecture = IDENTITY[tiny_model.family]
    assert metadata["ss_base_model_version"] == version
    assert metadata["modelspec.architecture"] == architecture
    assert (tmp_path / "config.json").is_file()
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def _nan_after(run: TrainingRun, step: int) -> None:
    """Make the loss NaN from optimizer step `step` on (as a diverging run would)."""
    original = run.model.forward

    def forward(batch, generator):
        loss = original(batch, generator)
        return loss * float("nan") if run.state.progress.step + 1 >= step else loss

    run.model.forward = forward


def test_nonfinite_loss_stops_naming_step_and_backup(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, backup={"every_n_steps": 1})
    run = TrainingRun(load_config(raw=raw))
    before = {k: v.clone() for k, v in run.network.state_dict().items()}
    _nan_after(run, 3)
    with pytest.raises(RunError) as caught:
        run.run()
    message = str(caught.value)
    assert "step 3" in message and str(tmp_path / "backups" / "step-000002") in message
    assert "on_nonfinite=skip" in message
    assert all(torch.isfinite(v).all() for v in run.network.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in run.network.state_dict().items())


def test_nonfinite_loss_skip_mode_counts_and_finishes(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        training={"on_nonfinite": "skip", "max_steps": 4},
    )
    run = TrainingRun(load_config(raw=raw))
    _nan_after(run, 3)
    result = run.run()
    assert result.steps == 4 and run.state.progress.skipped_steps == 2
    weights = load_file(result.paths.output)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_missing_concept_folder_fails_before_model_load(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "no-model", tmp_path / "no-data", tmp_path)
    with pytest.raises(UserError, match=r"data.concepts.0.path: folder .*no-data.* does not exist"):
        train(load_config(raw=raw))


def test_unreachable_base_model_names_the_source(tiny_dataset_path: Path, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "missing-model", tiny_dataset_path, tmp_path)
    with pytest.raises(UserError, match=r"as a Hugging Face repo id failed.*offline"):
        train(load_config(raw=raw))


def test_single_file_offline_needs_config_folder(tiny_dataset_path: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    raw = tiny_config(checkpoint, tiny_dataset_path, tmp_path)
    with pytest.raises(UserError, match=r"single-file checkpoint needs model.single_file_config"):
        train(load_config(raw=raw))


def test_pickled_checkpoint_is_refused(tiny_dataset_path: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not loaded")
    raw = tiny_config(checkpoint, tiny_dataset_path, tmp_path)
    with pytest.raises(UserError, match=r"only .safetensors single files"):
        train(load_config(raw=raw))


@pytest.mark.parametrize("name", ["sgd", "adafactor", "prodigy"])
def test_each_optimizer_trains(
    name: str, tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    lr = {"sgd": 0.05, "adafactor": 1e-3, "prodigy": 1.0}[name]
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        optimizer={"name": name, "learning_rate": lr},
        training={"max_steps": 2},
    )
    result = train(load_config(raw=raw))
    weights = load_file(result.paths.output)
    assert any(v.abs().max() > 0 for k, v in weights.items() if k.endswith("lora_up.weight"))


def test_adamw_8bit_without_cuda_is_a_clear_error(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run adamw_8bit")
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, optimizer={"name": "adamw_8bit"})
    with pytest.raises(UserError, match=r"'adamw_8bit' needs a CUDA GPU"):
        train(load_config(raw=raw))


def test_text_encoder_lora_and_v_prediction_with_min_snr(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path,
        tiny_dataset_path,
        tmp_path,
        model={
            "base_model": str(tiny_sdxl_path),
            "prediction_type": "v_prediction",
            "text_encoder": {"train": True, "learning_rate": 5e-4},
            "text_encoder_2": {"train": True},
            "min_snr_gamma": 5.0,
        },
        training={"max_steps": 2, "gradient_checkpointing": True},
    )
    run = TrainingRun(load_config(raw=raw))
    groups = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert groups == {"text_encoder": 5e-4, "text_encoder_2": 1e-3, "unet": 1e-3}
    result = run.run()
    weights = load_file(result.paths.output)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        ups = [
            v for k, v in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")
        ]
        assert ups and any(v.abs().max() > 0 for v in ups), prefix


def test_bf16_mixed_precision_runs_on_cpu(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        training={"max_steps": 2, "mixed_precision": "bf16"},
    )
    result = train(load_config(raw=raw))
    weights = load_file(result.paths.output)
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize(
    ("tiny_model", "layout"),
    [
        ("sdxl", "kohya"),
        ("sdxl", "diffusers"),
        ("flux", "kohya"),
        ("flux", "comfyui"),
        ("flux", "diffusers"),
    ],
    indirect=["tiny_model"],
)
def test_continue_training_from_a_saved_lora(
    layout: str, tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    first = tiny_model.config(
        tiny_dataset_path,
        tmp_path / "first",
        training={"max_steps": 2},
        output={"format": layout, "save_dtype": "float32"},
    )
    saved = train(load_config(raw=first)).paths.output
    second = tiny_model.config(
        tiny_dataset_path,
        tmp_path / "second",
        lora={"init_from": str(saved)},
        training={"max_steps": 1},
    )
    run = TrainingRun(load_config(raw=second))
    reference = TrainingRun(load_config(raw=first))
    from modules.lora.formats import load_lora_into

    assert load_lora_into(reference.network, saved) == layout
    loaded = {}
    for name, adapter in run.network.adapters.items():
        expected = reference.network.adapters[name].merged_delta_weight()
        loaded[name] = adapter.merged_delta_weight().detach().clone()
        torch.testing.assert_close(loaded[name], expected, rtol=1e-5, atol=1e-7)
    assert any(delta.abs().max() > 0 for delta in loaded.values())
    result = run.run()  # and training goes on from there
    assert result.steps == 1 and not result.interrupted
    moved = [
        not torch.equal(adapter.merged_delta_weight(), loaded[name])
        for name, adapter in run.network.adapters.items()
    ]
    assert all(moved)


def test_continue_from_a_lora_of_another_rank_keeps_the_files_rank(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """A LoRA's rank is its own: continuing it trains on at that rank (lora.rank is for new
    layers), and the saved file says so."""
    first = tiny_model.config(tiny_dataset_path, tmp_path / "a", training={"max_steps": 1})
    saved = train(load_config(raw=first)).paths.output
    second = tiny_model.config(
        tiny_dataset_path,
        tmp_path / "b",
        lora={"rank": 8, "alpha": 8, "init_from": str(saved)},
        training={"max_steps": 1},
    )
    result = train(load_config(raw=second))
    with safe_open(result.paths.output, "pt") as handle:
        assert handle.metadata()["ss_network_dim"] == "4"
    before, after = load_file(saved), load_file(result.paths.output)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}


def test_bad_optimizer_extra_kwargs_is_a_user_error(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path, tiny_dataset_path, tmp_path, optimizer={"extra_kwargs": {"warp": 9}}
    )
    with pytest.raises(UserError, match=r"optimizer.extra_kwargs \['warp'\] rejected by adamw"):
        TrainingRun(load_config(raw=raw))
