"""Where the base model is while the caches fill and after: the encoders fill them alone, the
denoiser comes to the device afterwards, and encoders done with stay in CPU memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import modules.training.trainer as trainer_module
from modules.config.loading import load_config
from modules.models.placement import to_device_except
from modules.models.registry import get_family
from modules.training.trainer import TrainingRun
from tests.helpers import TinyModel


def devices(module: nn.Module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def denoiser_of(run: TrainingRun) -> nn.Module:
    (name,) = [spec.name for spec in run.config.model.part_specs() if not spec.text_encoder]
    return getattr(run.base, name)


def test_to_device_except_leaves_the_modules_away_where_they_are() -> None:
    """The meta device stands in for the GPU: everything moves but the modules away, untouched
    (same tensors, same values), also when a module holding one has tensors of its own."""
    torch.manual_seed(0)
    encoder = nn.Linear(4, 4)
    kept = {name: t.clone() for name, t in encoder.state_dict().items()}
    inner = nn.Sequential(nn.Linear(4, 4), encoder)
    model = nn.Module()
    model.denoiser = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    model.inner = inner
    model.scale = nn.Parameter(torch.ones(3), requires_grad=False)
    model.register_buffer("offset", torch.zeros(2))
    weight = encoder.weight

    to_device_except(model, "meta", away=[encoder])
    assert devices(model.denoiser) == {"meta"} and devices(inner[0]) == {"meta"}
    assert model.scale.is_meta and not model.scale.requires_grad and model.offset.is_meta
    assert encoder.weight is weight and devices(encoder) == {"cpu"}
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, kept[name])
    # without anything away it is Module.to
    to_device_except(encoder, "meta")
    assert devices(encoder) == {"meta"}


def test_the_caches_fill_before_the_denoiser_comes_to_the_device(
    tiny_model: TinyModel, tiny_dataset_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every encode for the caches runs before the trainer places the model; it places it
    without the encoders the data pipeline is done with, and accelerate then prepares only the
    LoRA network (moving the whole base would bring those encoders back). On a GPU the denoiser
    is in CPU memory while the encoders run, and on the GPU afterwards."""
    events: list[tuple] = []
    family_class = type(get_family(tiny_model.family))
    holder: dict[str, nn.Module] = {}

    def spy(name: str):
        real = getattr(family_class, name)

        def recorded(self, model, *args, **kwargs):
            denoiser = holder.get("denoiser")
            events.append((name, devices(denoiser) if denoiser is not None else None))
            return real(self, model, *args, **kwargs)

        return recorded

    for name in ("encode_latents", "encode_text"):
        monkeypatch.setattr(family_class, name, spy(name))
    real_load = family_class.load

    def load(self, config):
        base = real_load(self, config)
        (part,) = [spec.name for spec in config.model.part_specs() if not spec.text_encoder]
        holder["denoiser"] = getattr(base, part)
        return base

    monkeypatch.setattr(family_class, "load", load)

    def place(module, device, *, away=()):
        events.append(("place", module, list(away)))
        to_device_except(module, device, away=away)

    monkeypatch.setattr(trainer_module, "to_device_except", place)
    real_prepare = Accelerator.prepare

    def prepare(self, *args, **kwargs):
        events.append(("prepare", args[0]))
        return real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "prepare", prepare)

    config = load_config(raw=tiny_model.config(tiny_dataset_path, tmp_path))
    run = TrainingRun(config)
    kinds = [event[0] for event in events]
    assert kinds == ["encode_latents"] * 2 + ["encode_text"] * 2 + ["place", "prepare"]
    _, placed, away = events[-2]
    assert placed is run.base and away == run.dataset.encoders.modules
    prepared = events[-1][1]
    assert {id(p) for p in prepared.parameters()} == {id(p) for p in run.network.parameters()}
    assert all(id(p) not in {id(q) for q in prepared.parameters()} for p in run.base.parameters())

    device = run.accelerator.device.type
    assert devices(denoiser_of(run)) == {device}
    if device == "cuda":
        assert all(event[1] == {"cpu"} for event in events[:4])
        assert run.dataset.encoders.modules  # everything cached: all encoders left the GPU
        for encoder in run.dataset.encoders.modules:
            assert devices(encoder) == {"cpu"}
    run.run()  # and it trains from there
    assert run.state.progress.step == config.training.max_steps
