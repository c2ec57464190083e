"""Flux as a user trains it: the preset through the CLI, preconditioned runs, CLIP-L, bfloat16
frozen parts, [schnell], LoRA+, sampling with the LoRA applied.

The family-neutral behaviour (resume, validation, caches, buckets, masks, files read back) is
covered by the tests parametrised with `tiny_model` in test_training.py, test_data_*.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modules.config.loading import load_config
from modules.errors import UserError
from modules.models.flux.tiny import build_tiny_flux
from modules.training.trainer import TrainingRun, train
from tests.conftest import FAMILY_SETTINGS
from tests.helpers import TinyModel, run_cli, straight_and_resumed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def flux(tiny_flux_path: Path) -> TinyModel:
    return TinyModel("flux", tiny_flux_path, FAMILY_SETTINGS["flux"])


def _overfit(run: TrainingRun, steps: int) -> list[float]:
    """Train `steps` on the same batch, noise and timesteps; the losses."""
    _, batch = run.dataset.load(0)
    losses = []
    for _ in range(steps):
        with run.pipeline.micro_batch():
            loss = run.model(batch, torch.Generator().manual_seed(0))
        run.pipeline.backward(loss)
        losses.append(run.pipeline.step().loss)
    return losses


@pytest.mark.parametrize("preconditioner", ["riemannian", "adaprelora"])
def test_preconditioned_lora_overfits_one_batch(
    preconditioner: str, flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = flux.config(
        tiny_dataset_path,
        tmp_path,
        lora={"rank": 8, "alpha": 8, "layer_preset": "full", "preconditioner": preconditioner},
        optimizer={"learning_rate": 3e-3, "weight_decay": 0.0},
        training={"batch_size": 2, "max_grad_norm": 0},
    )
    run = TrainingRun(load_config(raw=raw))
    assert run.preconditioner is not None
    losses = _overfit(run, 60)
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[-5:]) <= 0.5 * losses[0], losses


@pytest.mark.usefixtures("deterministic_kernels")
@pytest.mark.parametrize("preconditioner", ["riemannian", "adaprelora"])
def test_preconditioned_resume_is_exact(
    preconditioner: str, flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """AdaPreLoRA's running statistics and the optimizer state come back from the backup."""
    sections = {
        "lora": {"rank": 4, "alpha": 4, "preconditioner": preconditioner},
        "training": {"max_steps": 5, "batch_size": 1, "gradient_accumulation_steps": 2},
        "output": {"save_dtype": "float32"},
    }
    a, b = straight_and_resumed(
        lambda workspace: load_config(raw=flux.config(tiny_dataset_path, workspace, **sections)),
        tmp_path,
        stop_at=2,
    )
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) < 1e-6


def test_loraplus_gives_each_part_an_up_group(
    flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = flux.config(
        tiny_dataset_path,
        tmp_path,
        model={"text_encoder": {"train": True, "learning_rate": 2e-4}},
        lora={"loraplus_ratio": 16},
    )
    run = TrainingRun(load_config(raw=raw))
    groups = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
    assert groups == {
        "transformer": 1e-3,
        "transformer_up": 1.6e-2,
        "text_encoder": 2e-4,
        "text_encoder_up": pytest.approx(3.2e-3),
    }


def test_clip_lora_with_checkpointing_shift_and_weighting(
    flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """CLIP-L trains beside the transformer; checkpointing changes no gradient."""
    model = {
        "text_encoder": {"train": True},
        "timestep_sampling": "uniform",
        "timestep_shift": "fixed",
        "shift": 3.0,
        "loss_weighting": "cosmap",
    }
    gradients = []
    for checkpointing in (False, True):
        raw = flux.config(
            tiny_dataset_path,
            tmp_path / str(checkpointing),
            model=model,
            training={"max_steps": 2, "gradient_checkpointing": checkpointing},
        )
        run = TrainingRun(load_config(raw=raw))
        assert run.config.data.cache_text_embeddings and run.dataset.encoders.modules == []
        _, batch = run.dataset.load(0)
        assert batch.text is None  # a trained text encoder runs live
        with run.pipeline.micro_batch():
            loss = run.model(batch, torch.Generator().manual_seed(0))
        run.pipeline.backward(loss)
        gradients.append([p.grad.clone() for p in run.network.parameters()])
        run.pipeline.step()
    for plain, checkpointed in zip(*gradients, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-8)
    weights = load_file(run.run().paths.output)
    for prefix in ("lora_unet_", "lora_te1_"):
        ups = [
            v for k, v in weights.items() if k.startswith(prefix) and k.endswith("lora_up.weight")
        ]
        assert ups and all(v.abs().max() > 0 for v in ups), prefix


def test_bfloat16_frozen_parts_by_default(
    tiny_flux_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """Flux's parts load in bfloat16 unless told otherwise; the VAE stays float32."""
    model = TinyModel("flux", tiny_flux_path, {"family": "flux", "t5_max_length": 16})
    raw = model.config(
        tiny_dataset_path, tmp_path, training={"max_steps": 2, "mixed_precision": "bf16"}
    )
    run = TrainingRun(load_config(raw=raw))
    base = run.base
    dtypes = {
        part: getattr(base, part).dtype
        for part in ("transformer", "text_encoder", "text_encoder_2")
    }
    assert set(dtypes.values()) == {torch.bfloat16} and base.vae.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in run.network.parameters())
    result = run.run()
    assert all(torch.isfinite(v).all() for v in load_file(result.paths.output).values())


def test_schnell_trains_without_guidance(tiny_dataset_path: Path, tmp_path: Path) -> None:
    schnell = build_tiny_flux(tmp_path / "schnell", seed=2, guidance_embeds=False)
    model = TinyModel("flux", schnell, FAMILY_SETTINGS["flux"])
    result = train(load_config(raw=model.config(tiny_dataset_path, tmp_path / "ws")))
    with safe_open(result.paths.output, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"


def test_samples_show_the_lora(flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path) -> None:
    raw = flux.config(
        tiny_dataset_path,
        tmp_path,
        sampling={"prompts": ["a red circle"], "steps": 3, "cfg_scale": 3.5},
    )
    run = TrainingRun(load_config(raw=raw))
    pipe = run.family.sampling_pipeline(run.base)

    def sample() -> torch.Tensor:
        image = pipe(
            prompt="a red circle",
            negative_prompt=None,
            num_inference_steps=3,
            guidance_scale=3.5,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        assert image.size == (64, 64)
        return torch.tensor(list(image.getdata()), dtype=torch.float32)

    with torch.no_grad():
        for adapter in run.network.adapters.values():
            adapter.lora_up.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
        with_lora = sample()
        run.network.detach()
        without = sample()
        run.network.attach()
    assert (with_lora - without).abs().mean() > 1.0  # of 255
    run.sample(0)
    assert (tmp_path / "samples" / "000000" / "00.png").is_file()


def test_quantized_base_is_not_silently_ignored(
    flux: TinyModel, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    raw = flux.config(tiny_dataset_path, tmp_path, model={"quantize_base": "int8"})
    with pytest.raises(UserError, match=r"model.quantize_base .* not available"):
        TrainingRun(load_config(raw=raw))


@pytest.mark.slow
def test_flux_preset_trains_from_the_cli(
    tiny_flux_path: Path, tiny_dataset_path: Path, tmp_path: Path
) -> None:
    """training_presets/flux_dev_lora.json as a user runs it, pointed at the tiny model."""
    workspace = tmp_path / "ws"
    concepts = json.dumps([{"path": str(tiny_dataset_path)}])
    result = run_cli(
        "--config-path",
        str(ROOT / "training_presets" / "flux_dev_lora.json"),
        "--set",
        f"model.base_model={tiny_flux_path}",
        "--set",
        "model.t5_max_length=16",
        "--set",
        f"data.concepts={concepts}",
        "--set",
        "data.resolution=64",
        "--set",
        "data.workers=0",
        "--set",
        "training.max_steps=2",
        "--set",
        "training.gradient_accumulation_steps=1",
        "--set",
        "sampling.steps=2",
        "--set",
        f"output.workspace_dir={workspace}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lora = workspace / "my_flux_lora.safetensors"
    keys = load_file(lora)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in keys
    assert (workspace / "samples" / "000002" / "00.png").is_file()
