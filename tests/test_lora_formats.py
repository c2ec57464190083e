"""LoRA files: diffusers loads what we save with identical outputs, and we load them back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from pydantic import BaseModel

from modules.config.loading import load_config
from modules.config.local_paths import local_path_mark, shareable_config
from modules.config.schema import TrainConfig
from modules.errors import UserError
from modules.lora.formats import build_metadata, load_lora_into, read_lora_metadata, save_lora
from modules.lora.layers import lora_pairs
from modules.lora.network import LoRANetwork
from modules.models.registry import family_configs
from modules.models.sdxl.keys import sdxl_lora_layouts
from modules.models.sdxl.layers import sdxl_lora_targets

PRESETS = ["attn", "attn-mlp", "full"]
LAYOUTS = ["kohya", "diffusers"]
ALL_PARTS = {"unet", "text_encoder", "text_encoder_2"}


def load_pipe(path: Path) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(path)


def make_network(
    pipe: StableDiffusionXLPipeline,
    *,
    preset: str,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
) -> LoRANetwork:
    """A LoRA network on every part of `pipe` with SDXL's file layouts, random non-zero A and B."""
    targets = sdxl_lora_targets(
        modules={part: getattr(pipe, part) for part in ALL_PARTS},
        train_parts=ALL_PARTS,
        layer_preset=preset,
        layer_patterns=[],
    )
    network = LoRANetwork.inject(
        targets,
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        layouts=sdxl_lora_layouts(pipe.unet.config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.adapters.values():
            for weight in (adapter.lora_down.weight, adapter.lora_up.weight):
                weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
    return network


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path: Path) -> StableDiffusionXLPipeline:
    """One base pipeline per module; networks made on it are detached after each test."""
    return load_pipe(tiny_sdxl_path)


@pytest.fixture
def network_on(pipe: StableDiffusionXLPipeline) -> Iterator[Callable[..., LoRANetwork]]:
    made: list[LoRANetwork] = []

    def make(**kwargs) -> LoRANetwork:
        made.append(make_network(pipe, **kwargs))
        return made[-1]

    yield make
    for network in made:
        network.detach()


@contextlib.contextmanager
def loader_complaints() -> Iterator[list[str]]:
    """Collect what diffusers, transformers and peft report while loading a LoRA.

    diffusers 0.42 logs unexpected/missing UNet keys as a warning of `diffusers.utils.peft_utils`;
    transformers 5 logs a "LOAD REPORT" table (UNEXPECTED / MISSING) for the text encoders as a
    warning of `transformers.integrations.peft`; peft itself uses `warnings.warn`. Both library
    loggers stop propagation at their root, so a handler is attached there, with the level forced
    to WARNING in case something else silenced them.
    """
    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield complaints
        complaints.extend(
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if not issubclass(w.category, (DeprecationWarning, FutureWarning))
        )
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def load_in_diffusers(folder: Path, lora: Path) -> tuple[StableDiffusionXLPipeline, list[str]]:
    fresh = load_pipe(folder)
    with loader_complaints() as complaints:
        fresh.load_lora_weights(str(lora))
    return fresh, complaints


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


def unet_out(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 32, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    with torch.no_grad():
        return pipe.unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def text_outs(pipe: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    ids = torch.randint(
        0, pipe.tokenizer.vocab_size, (1, 77), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        te1 = pipe.text_encoder(ids, output_hidden_states=True)
        te2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    return {
        "te1 penultimate": te1.hidden_states[-2],
        "te1 last": te1.last_hidden_state,
        "te2 penultimate": te2.hidden_states[-2],
        "te2 text_embeds": te2.text_embeds,
    }


def metadata() -> dict[str, str]:
    return build_metadata(
        config_json=json.dumps({"lora": {"rank": 4, "alpha": 2.0}}),
        rank=4,
        alpha=2.0,
        title="tiny",
        resolution=1024,
        trigger_phrase="sks",
    )


# --- diffusers loads our files and computes what the trainer computes ---------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_diffusers_loads_file_with_identical_outputs(
    preset: str, layout: str, pipe, network_on, tiny_sdxl_path: Path, tmp_path: Path
) -> None:
    network = network_on(preset=preset)
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout=layout, metadata=metadata(), dtype=torch.float32)

    fresh, complaints = load_in_diffusers(tiny_sdxl_path, file)
    assert complaints == []

    trainer_unet, trainer_text = unet_out(pipe), text_outs(pipe)
    network.detach()
    base_unet, base_text = unet_out(pipe), text_outs(pipe)
    network.attach()

    assert rel_err(base_unet, trainer_unet) > 1e-3, "the LoRA should change the UNet output"
    assert rel_err(unet_out(fresh), trainer_unet) < 1e-5
    diffusers_text = text_outs(fresh)
    for what, ref in trainer_text.items():
        assert rel_err(base_text[what], ref) > 1e-3, f"the LoRA should change {what}"
        assert rel_err(diffusers_text[what], ref) < 1e-5, what


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("extra unet key", "unexpected keys"),
        ("missing unet key", "missing keys"),
        ("extra text encoder key", "UNEXPECTED"),
        ("missing text encoder key", "MISSING"),
    ],
)
def test_loader_complaints_are_caught(
    tamper: str, expected: str, network_on, tiny_sdxl_path: Path, tmp_path: Path
) -> None:
    """The key test above can fail: a tampered file makes `loader_complaints` report it."""
    file = tmp_path / "lora.safetensors"
    save_lora(network_on(preset="attn"), file, layout="diffusers", metadata={}, dtype=None)
    tensors = safetensors.torch.load_file(file)
    part = "unet." if "unet" in tamper else "text_encoder."
    key_a = next(k for k in sorted(tensors) if k.startswith(part) and k.endswith("lora_A.weight"))
    if "extra" in tamper:
        tensors[key_a.replace("lora_A", "lora_C")] = tensors[key_a].clone()
    else:
        del tensors[key_a.replace("lora_A", "lora_B")]
    safetensors.torch.save_file(tensors, file)

    _, complaints = load_in_diffusers(tiny_sdxl_path, file)
    assert any(expected in complaint for complaint in complaints), complaints


# --- metadata -------------------------------------------------------------------------------------


def test_metadata_is_written_as_strings_and_config_round_trips(network_on, tmp_path: Path) -> None:
    config = {"lora": {"rank": 4, "alpha": 2.0}, "data": {"path": "dataset", "repeats": 3}}
    meta = build_metadata(
        config_json=json.dumps(config),
        rank=4,
        alpha=2.0,
        title="my-concept",
        resolution=(1024, 768),
        trigger_phrase="sks dog",
    )
    file = tmp_path / "lora.safetensors"
    save_lora(network_on(preset="attn"), file, layout="kohya", metadata=meta)

    read = read_lora_metadata(file)
    assert read == meta
    assert all(isinstance(v, str) for v in read.values())
    assert json.loads(read["geodesic.config"]) == config
    assert read["ss_base_model_version"] == "sdxl_base_v1-0"
    assert read["ss_network_module"] == "networks.lora"
    assert (read["ss_network_dim"], read["ss_network_alpha"]) == ("4", "2.0")
    assert read["ss_output_name"] == read["modelspec.title"] == "my-concept"
    assert read["modelspec.sai_model_spec"] == "1.0.0"
    assert read["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert read["modelspec.resolution"] == "1024x768"
    assert read["modelspec.trigger_phrase"] == "sks dog"
    assert read["modelspec.date"][:2] == "20" and "T" in read["modelspec.date"]


def test_shareable_config_blanks_every_local_path(tmp_path: Path) -> None:
    """What a LoRA's metadata embeds: the settings, without the user's folders; a Hugging Face
    repo id is not a folder and stays."""
    data, held_out = tmp_path / "alice" / "photos", tmp_path / "alice" / "held_out"
    data.mkdir(parents=True)
    raw = {
        "model": {"base_model": "stabilityai/stable-diffusion-xl-base-1.0"},
        "lora": {"rank": 8, "init_from": str(tmp_path / "alice" / "old.safetensors")},
        "data": {
            "concepts": [{"path": str(data), "repeats": 3}, {"path": "relative/set"}],
            "cache_dir": "~/cache",
            "validation": {"concepts": [{"path": str(held_out)}]},
        },
        "output": {
            "workspace_dir": str(tmp_path / "alice" / "run"),
            "output_path": "x.safetensors",
        },
    }
    shared = shareable_config(load_config(raw=raw))
    assert "alice" not in json.dumps(shared)
    assert shared["model"]["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert [c["path"] for c in shared["data"]["concepts"]] == ["", ""]
    assert shared["data"]["concepts"][0]["repeats"] == 3 and shared["lora"]["rank"] == 8
    assert shared["data"]["validation"]["concepts"][0]["path"] == ""
    assert shared["data"]["cache_dir"] == shared["output"]["output_path"] == ""
    (tmp_path / "org" / "model").mkdir(parents=True)  # a local folder shaped like a repo id
    raw["model"]["base_model"] = "org/model"
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert shareable_config(load_config(raw=raw))["model"]["base_model"] == ""
    finally:
        os.chdir(cwd)


def _config_fields(section: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, info in section.model_fields.items():
        yield prefix + name, info
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from _config_fields(inner, f"{prefix}{name}.")


def test_every_field_naming_a_file_or_folder_is_a_local_path() -> None:
    """A new path option declared as plain `str` would leak into shared LoRAs: caught here."""
    fields = dict(_config_fields(TrainConfig))
    for family in family_configs():
        fields |= dict(_config_fields(family, f"model({family.__name__})."))
    named_like_paths = {
        key
        for key, info in fields.items()
        if re.search(r"(path|_dir|folder|file|base_model|init_from)$|single_file", key)
        and info.annotation is not bool
    }
    local = {key for key, info in fields.items() if local_path_mark(info)}
    assert named_like_paths, "the search found nothing: the schema walk is broken"
    assert named_like_paths <= local, named_like_paths - local


def test_default_save_is_fp16_with_scalar_alpha(network_on, tmp_path: Path) -> None:
    network = network_on(preset="attn")
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout="kohya", metadata={})
    tensors = safetensors.torch.load_file(file)
    assert len(tensors) == len(network.adapters.state_dict())
    stem = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # SGM name
    assert tensors[f"{stem}.lora_down.weight"].dtype == torch.float16
    assert tensors[f"{stem}.alpha"].shape == ()
    assert tensors[f"{stem}.alpha"].item() == 2.0


# --- loading back into the trainer ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_into_a_fresh_network(
    layout: str, network_on, tiny_sdxl_path: Path, tmp_path: Path
) -> None:
    saved = network_on(preset="attn-mlp", seed=0)
    file = tmp_path / "lora.safetensors"
    save_lora(saved, file, layout=layout, metadata={}, dtype=torch.float32)

    # another lora.alpha in the new config: the effective delta must still match the file
    fresh = make_network(load_pipe(tiny_sdxl_path), preset="attn-mlp", alpha=8.0, seed=1)
    params_before = {name: list(a.parameters()) for name, a in fresh.adapters.items()}
    assert load_lora_into(fresh, file) == layout

    for name, adapter in fresh.adapters.items():
        want = saved.adapters[name].merged_delta_weight()
        assert torch.allclose(adapter.merged_delta_weight(), want, rtol=1e-5, atol=1e-7), name
        down, up = adapter.lora_down.weight, adapter.lora_up.weight
        assert [down, up] == params_before[name], "load must copy in place"
        assert down._lora_pair is up and up._lora_pair is down
        assert (down._lora_role, up._lora_role) == ("A", "B")
    assert len(lora_pairs(fresh.parameters())) == len(fresh.adapters)


def test_diffusers_layout_without_text_model_wrapper_loads(network_on, tmp_path: Path) -> None:
    """We write CLIP keys with `text_model.` (older loaders need it; transformers 5 dropped the
    wrapper from CLIPTextModel but not from CLIPTextModelWithProjection); files without it load."""
    saved = network_on(preset="attn", seed=0)
    file = tmp_path / "lora.safetensors"
    save_lora(saved, file, layout="diffusers", metadata={}, dtype=None)
    tensors = safetensors.torch.load_file(file)
    te_keys = [key for key in tensors if key.startswith("text_encoder")]
    assert {key.split(".")[0] for key in te_keys} == {"text_encoder", "text_encoder_2"}
    assert all(".text_model.encoder.layers." in key for key in te_keys)
    safetensors.torch.save_file(
        {k.replace(".text_model.", "."): v for k, v in tensors.items()}, file
    )

    target = network_on(preset="attn", seed=3)
    load_lora_into(target, file)
    for name, adapter in target.adapters.items():
        want = saved.adapters[name].merged_delta_weight()
        assert torch.allclose(adapter.merged_delta_weight(), want, rtol=1e-5, atol=1e-7), name


def test_diffusers_trained_file_with_alpha_in_header_loads(network_on, tmp_path: Path) -> None:
    """diffusers' own `save_lora_weights` keeps B unscaled and records lora_alpha in the header."""
    saved = network_on(preset="attn", seed=0)
    file = tmp_path / "lora.safetensors"
    save_lora(saved, file, layout="diffusers", metadata={}, dtype=None)
    tensors = safetensors.torch.load_file(file)
    # scale 8 / 4 = 2 recorded in the header, so B is stored halved
    tensors = {k: v / 2 if k.endswith("lora_B.weight") else v for k, v in tensors.items()}
    header = {
        f"{part}.{field}": value
        for part in ALL_PARTS
        for field, value in [("r", 4), ("lora_alpha", 8)]
    }
    safetensors.torch.save_file(
        tensors, file, metadata={"lora_adapter_metadata": json.dumps(header)}
    )

    target = network_on(preset="attn", seed=3)
    load_lora_into(target, file)
    for name, adapter in target.adapters.items():
        want = saved.adapters[name].merged_delta_weight()
        assert torch.allclose(adapter.merged_delta_weight(), want, rtol=1e-5, atol=1e-7), name


# --- errors as the user sees them -----------------------------------------------------------------


def _one_line_user_error(excinfo: pytest.ExceptionInfo[UserError], file: Path) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(file) in message
    return message


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank_mismatch_names_key_and_rank(layout: str, network_on, tmp_path: Path) -> None:
    file = tmp_path / "rank8.safetensors"
    save_lora(network_on(preset="attn", rank=8), file, layout=layout, metadata={})
    target = network_on(preset="attn", rank=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(UserError) as excinfo:
        load_lora_into(target, file)
    message = _one_line_user_error(excinfo, file)
    assert "rank" in message and "lora.rank" in message
    assert "key '" in message and "(8, " in message and "(4, " in message
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items()), "untouched"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_file_of_another_layer_preset_is_refused(layout: str, network_on, tmp_path: Path) -> None:
    full_file, attn_file = tmp_path / "full.safetensors", tmp_path / "attn.safetensors"
    save_lora(network_on(preset="full"), full_file, layout=layout, metadata={})
    attn = network_on(preset="attn")
    save_lora(attn, attn_file, layout=layout, metadata={})
    full_keys = set(safetensors.torch.load_file(full_file))
    first_extra = sorted(full_keys - set(safetensors.torch.load_file(attn_file)))[0]

    with pytest.raises(UserError) as excinfo:
        load_lora_into(attn, full_file)
    message = _one_line_user_error(excinfo, full_file)
    assert f"key {first_extra!r} matches no LoRA layer" in message

    with pytest.raises(UserError) as excinfo:
        load_lora_into(network_on(preset="full"), attn_file)
    assert "has no weights for LoRA layer '" in _one_line_user_error(excinfo, attn_file)


def test_non_safetensors_file_is_refused_without_unpickling(network_on, tmp_path: Path) -> None:
    network = network_on(preset="attn")
    pickled = tmp_path / "lora.safetensors"
    torch.save(network.state_dict(), pickled)
    with pytest.raises(UserError) as excinfo:
        load_lora_into(network, pickled)
    assert "safetensors" in _one_line_user_error(excinfo, pickled)
    with pytest.raises(UserError) as excinfo:
        read_lora_metadata(pickled)
    _one_line_user_error(excinfo, pickled)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(UserError) as excinfo:
        load_lora_into(network, missing)
    assert "not found" in _one_line_user_error(excinfo, missing)


def test_safetensors_without_lora_keys_is_refused(network_on, tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"conv_in.weight": torch.zeros(4, 4)}, file)
    with pytest.raises(UserError) as excinfo:
        load_lora_into(network_on(preset="attn"), file)
    assert "conv_in.weight" in _one_line_user_error(excinfo, file)


# --- atomic save ----------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(
    network_on, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = network_on(preset="attn")
    file = tmp_path / "lora.safetensors"
    save_lora(network, file, layout="kohya", metadata={"geodesic.config": "{}"})
    good = file.read_bytes()

    def half_write(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_lora(network, file, layout="diffusers", metadata={})
    assert file.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [file.name]
