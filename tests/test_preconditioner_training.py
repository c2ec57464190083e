"""Preconditioning and LoRA+ in real runs of each family's tiny model: CLI, resume, diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.config.schema import TrainConfig
from modules.lora.preconditioning.directions import riemannian_directions
from modules.training.trainer import TrainingRun
from tests.flux_networks import transformer_out
from tests.helpers import TinyModel, run_cli, straight_and_resumed, tiny_config
from tests.test_lora_formats import (
    load_in_diffusers,
    load_pipe,
    loader_complaints,
    rel_err,
    unet_out,
)

ADAPRELORA = {"preconditioner": "adaprelora"}
# The layout each family's file is saved in for diffusers to load it whole (diffusers drops some
# of Flux's layers in BFL's names at the tiny model's width; tests/test_flux_lora_files.py)
DIFFUSERS_FORMAT = {"sdxl": "kohya", "flux": "diffusers"}


def denoiser_outputs_in_diffusers(
    tiny_model: TinyModel, lora: Path | None
) -> tuple[torch.Tensor, list[str]]:
    """The denoiser's output for fixed inputs in a diffusers pipeline of the tiny model, with
    `lora` loaded by diffusers (none: the base model), and what diffusers complained about."""
    if tiny_model.family == "flux":
        pipe = FluxPipeline.from_pretrained(tiny_model.path)
        if lora is None:
            return transformer_out(pipe.transformer), []
        with loader_complaints() as complaints:
            pipe.load_lora_weights(str(lora))
        return transformer_out(pipe.transformer), complaints
    if lora is None:
        return unet_out(load_pipe(tiny_model.path)), []
    pipe, complaints = load_in_diffusers(tiny_model.path, lora)
    return unet_out(pipe), complaints


@pytest.mark.parametrize(
    ("lora", "training"),
    [
        ({"preconditioner": "riemannian"}, {}),
        ({**ADAPRELORA, "adaprelora_probes": 4}, {"gradient_checkpointing": True}),
    ],
    ids=["riemannian", "adaprelora-checkpointing"],
)
def test_loss_falls_with_preconditioning(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path, lora: dict, training: dict
) -> None:
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        lora={"rank": 8, "alpha": 8, "layer_preset": "full", **lora},
        optimizer={"learning_rate": 3e-3, "weight_decay": 0.0},
        training={"batch_size": 2, "max_grad_norm": 0, **training},
    )
    run = TrainingRun(load_config(raw=raw))
    assert run.preconditioner is not None
    _, batch = run.dataset.load(0)
    losses = []
    for _ in range(60):  # as many as the plain run of test_training.py gets to halve its loss
        with run.pipeline.micro_batch():
            loss = run.model(batch, torch.Generator().manual_seed(0))
        run.pipeline.backward(loss)
        losses.append(run.pipeline.step().loss)
    assert run.preconditioner.applied_steps == 60
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses


def test_cli_reports_coverage_and_the_lora_loads_in_diffusers(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Every part that can be trained is trained and preconditioned; the saved file loads in
    diffusers and changes what the denoiser computes."""
    raw = tiny_model.config(tiny_dataset_path, tmp_path)
    parts = [spec.name for spec in load_config(raw=raw).model.part_specs() if spec.trainable]
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        lora={"preconditioner": "riemannian", "layer_preset": "full"},
        model={part: {"train": True} for part in parts},
        output={"save_dtype": "float32", "format": DIFFUSERS_FORMAT[tiny_model.family]},
    )
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(config_path), "--set", "training.max_steps=3")
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr  # transformers' import-time advice, not ours
    summary = next(line for line in result.stdout.splitlines() if "preconditioning on" in line)
    assert summary.startswith("riemannian preconditioning on ")
    assert len(parts) > 1
    for part in parts:
        assert f"{part}: " in summary
    assert "at rank 4" in summary
    assert "NOT preconditioned" not in summary

    lora_path = tmp_path / "test-lora.safetensors"
    weights = load_file(lora_path)
    ups = [v for k, v in weights.items() if k.endswith(("lora_up.weight", "lora_B.weight"))]
    assert ups and any(v.abs().max() > 0 for v in ups)
    trained, complaints = denoiser_outputs_in_diffusers(tiny_model, lora_path)
    assert complaints == []
    base, _ = denoiser_outputs_in_diffusers(tiny_model, None)
    assert rel_err(trained, base) > 1e-4  # it took effect


@pytest.mark.usefixtures("deterministic_kernels")
def test_resume_is_exact_with_adaprelora_statistics(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    sections = {
        "lora": {"rank": 4, "alpha": 2, **ADAPRELORA, "adaprelora_probes": 4},
        "training": {"max_steps": 6, "batch_size": 1, "gradient_accumulation_steps": 2},
        "backup": {"every_n_steps": 0},
        "output": {"save_dtype": "float32"},
    }

    def make_config(workspace: Path) -> TrainConfig:
        return load_config(raw=tiny_model.config(tiny_dataset_path, workspace, **sections))

    a, b = straight_and_resumed(make_config, tmp_path, stop_at=3)
    saved = torch.load(
        tmp_path / "stopped" / "backups" / "step-000003" / "state.pt", weights_only=True
    )
    assert saved["preconditioner"]["applied_steps"] == 3
    assert saved["preconditioner"]["rows"][0].abs().sum() > 0  # the Adafactor moments travel
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-6


def test_resuming_a_plain_backup_with_preconditioning_is_a_clear_error(
    tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_config(
        tiny_sdxl_path, tiny_dataset_path, tmp_path, training={"max_steps": 1}, backup={}
    )
    run = TrainingRun(load_config(raw=raw))
    run.run()
    run.backup()
    raw["lora"]["preconditioner"] = "riemannian"
    config_path = tmp_path / "on.json"
    config_path.write_text(json.dumps(raw), encoding="utf-8")
    result = run_cli("--config-path", str(config_path), "--resume")
    assert result.returncode == 2
    assert 'lora.preconditioner is "riemannian" but the backup was trained with "none"' in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("method", ["none", "adaprelora"])
def test_training_sees_the_same_parameters_and_gradients_either_way(
    method: str, tiny_sdxl_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Off, the optimizer has no hook; on or off, every factor and gradient owns its storage and
    a step ends with the gradients set to None: nothing outside the package changes."""
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path, lora={"preconditioner": method})
    run = TrainingRun(load_config(raw=raw))
    assert (run.preconditioner is None) == (method == "none")
    assert bool(run.optimizer.optimizer._optimizer_step_pre_hooks) == (method != "none")
    _, batch = run.dataset.load(0)
    with run.pipeline.micro_batch():
        loss = run.model(batch, torch.Generator().manual_seed(0))
    run.pipeline.backward(loss)
    parameters = list(run.network.parameters())
    tensors = [t for p in parameters for t in (p, p.grad)]
    pointers = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(pointers)) == len(pointers) == 2 * len(parameters)
    assert run.pipeline.step().applied
    assert all(p.grad is None for p in parameters)


def test_loraplus_gives_the_up_factors_ratio_times_the_learning_rate(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        lora={"loraplus_ratio": 16, "preconditioner": "riemannian"},
        model={"text_encoder": {"train": True, "learning_rate": 5e-4}},
        scheduler={"name": "constant"},
        training={"max_steps": 2},
    )
    run = TrainingRun(load_config(raw=raw))
    parts = run.network.parts()
    assert len(parts) == 2 and "text_encoder" in parts
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert set(groups) == {*parts, *(f"{part}_up" for part in parts)}
    for part in parts:
        lr = 5e-4 if part == "text_encoder" else 1e-3
        assert groups[part]["lr"] == pytest.approx(lr)
        assert groups[f"{part}_up"]["lr"] == pytest.approx(16 * lr)
        down, up = zip(*run.network.pairs(part), strict=True)
        assert groups[f"{part}_up"]["params"] == list(up)
        assert groups[part]["params"] == list(down)
    assert run.run().steps == 2


def test_adaprelora_statistics_are_the_same_with_gradient_checkpointing(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Checkpointing recomputes each block's forward pass in the backward pass; the sketches
    taken in the LoRA products must still count every micro-batch exactly once."""
    moments = []
    for checkpointing in (False, True):
        raw = tiny_model.config(
            tiny_dataset_path,
            tmp_path / str(checkpointing),
            lora={"rank": 4, "alpha": 4, **ADAPRELORA},
            training={"gradient_checkpointing": checkpointing, "gradient_accumulation_steps": 2},
        )
        run = TrainingRun(load_config(raw=raw))
        for position in range(2):
            _, batch = run.dataset.load(position)
            with run.pipeline.micro_batch():
                loss = run.model(batch, torch.Generator().manual_seed(position))
            run.pipeline.backward(loss)
        run.pipeline.step()
        moments.append([g.statistics.moment_rows.clone() for g in run.preconditioner.groups])
    assert moments[0][0].abs().sum() > 0
    for plain, recomputed in zip(*moments, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-4, atol=1e-12)


# every optimizer on SDXL; on Flux the default one (the hook does not depend on the family)
@pytest.mark.parametrize(
    ("tiny_model", "name"),
    [*(("sdxl", name) for name in ("adamw", "sgd", "adafactor", "prodigy")), ("flux", "adamw")],
    indirect=["tiny_model"],
)
def test_every_optimizer_steps_on_the_preconditioned_gradients(
    name: str, tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """With each optimizer the trainer offers (adamw_8bit needs CUDA), the gradients its step
    reads are the float64 Riemannian directions of the finished raw gradients, once a step."""
    raw = tiny_model.config(
        tiny_dataset_path,
        tmp_path,
        lora={"rank": 4, "alpha": 8, "preconditioner": "riemannian"},
        optimizer={"name": name, "learning_rate": 1.0 if name == "prodigy" else 1e-2},
        training={"max_steps": 3},
    )
    run = TrainingRun(load_config(raw=raw))
    preconditioner = run.preconditioner
    group = preconditioner.groups[0]
    raw_grads, read_by_step = [], []
    precondition = preconditioner.precondition

    def stacked(*, grads: bool) -> list[torch.Tensor]:
        """(A, B) or their gradients, stacked over the group's layers."""
        factors = zip(*group.pairs(), strict=True)
        return [
            torch.stack([(p.grad if grads else p).detach().flatten(1) for p in ps])
            for ps in factors
        ]

    def recording_precondition() -> None:
        raw_grads.append([*stacked(grads=False), *stacked(grads=True)])
        precondition()

    preconditioner.precondition = recording_precondition  # what the pre-hook calls
    # registered after the preconditioner's hook, so it runs after it, just before the update
    run.optimizer.optimizer.register_step_pre_hook(
        lambda *_: read_by_step.append(stacked(grads=True))
    )
    run.run()
    assert preconditioner.applied_steps == 3 and len(read_by_step) == 3
    assert stacked(grads=False)[1].abs().max() > 0  # B left zero at step 1: steps 2, 3 test g_A
    for (a, b, grad_a, grad_b), (read_a, read_b) in zip(raw_grads, read_by_step, strict=True):
        direction_a, direction_b = riemannian_directions(
            a=a.double(),
            b=b.double(),
            grad_a=grad_a.double(),
            grad_b=grad_b.double(),
            scale=group.scale().double(),
            damping=preconditioner.settings.damping,
        )
        # float32 against float64, to the largest entry's precision (entries near zero lose
        # digits to cancellation); g_A of the first step is exactly zero (B = 0) on both sides
        for read, direction in ((read_a, direction_a), (read_b, direction_b)):
            tolerance = 1e-5 * direction.abs().max().item()
            torch.testing.assert_close(read.double(), direction, rtol=0, atol=tolerance)
