"""The GUI's logic without a display: fields from the schema, the edited form, its messages
(the CLI's own), applicability, presets and what refuses Start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import ConfigError, load_config
from modules.config.schema import TrainConfig
from modules.data.scan import ScanIndex, scan_concepts
from modules.errors import UserError
from modules.models.registry import FAMILIES
from modules.models.sources import load_from_source
from modules.training.memory_preview import memory_estimate_lines
from modules.ui.fields import FieldSpec, Kind, ListSpec, form_fields
from modules.ui.form import ConfigForm
from modules.ui.presets import PresetLibrary, sparse
from modules.ui.run_control import RunProgress
from modules.ui.trainer_app import TABS, TrainerApp

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "training_presets").glob("*.json"))
# a base model the form takes without looking on disk (a repo id), so the rest can be checked
REPO_ID = "stabilityai/stable-diffusion-xl-base-1.0"


def _form() -> ConfigForm:
    """The default config with a base model: the one empty field that refuses Start."""
    return ConfigForm(TrainConfig.model_validate({"model": {"base_model": REPO_ID}}))


def _app(tmp_path: Path, **options: Any) -> TrainerApp:
    app = TrainerApp(presets=PresetLibrary(user_dir=tmp_path), estimate_memory=False, **options)
    app.form.set("model.base_model", REPO_ID)
    return app


def _leaves(value: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every value in a config's JSON (a list of sections by its first item)."""
    if isinstance(value, dict) and value:
        return [k for key, item in value.items() for k in _leaves(item, f"{prefix}{key}.")]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return _leaves(value[0], f"{prefix}0.")
    return [prefix.removesuffix(".")]


def _cli_message(raw: dict[str, Any], key: str, text: str) -> str:
    """What the CLI says for `--set key=text` over `raw` (one line, without the source)."""
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw, overrides=[f"{key}={text}"])
    return str(info.value).removeprefix("config: ")


# -- fields generated from the schema -----------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_config_value_has_an_input_on_a_known_tab(family: str) -> None:
    """Every value of the config is editable (no field needs a GUI edit to appear); only the
    version and the training settings (switch, learning rate) of a part that can never train
    are left out."""
    form = ConfigForm(TrainConfig.model_validate({"model": {"family": family}}))
    form.add_item("data.concepts")
    form.add_item("data.validation.concepts")
    keys = {spec.key for spec in form.fields()}
    frozen = {
        f"model.{spec.name}.{setting}"
        for spec in FAMILIES[family][0].part_specs()
        if not spec.trainable
        for setting in ("train", "learning_rate")
    }
    expected = set(_leaves(form.raw())) - {"config_version"} - frozen
    assert keys == expected
    assert {spec.tab for spec in form.specs} <= set(TABS)
    flux_only = {"model.guidance", "model.quantize_base", "model.offload_blocks"}
    assert flux_only <= keys if family == "flux" else not flux_only & keys


def test_fields_carry_the_declarations() -> None:
    specs = {s.key: s for s in form_fields("sdxl")}
    rank = specs["lora.rank"]
    assert (rank.kind, rank.tab, rank.label, rank.default) == (Kind.NUMBER, "lora", "Rank", 16)
    assert rank.bounds == ">= 1 and <= 1024"
    assert "LoRA rank" in rank.tooltip() and "Default: 16" in rank.tooltip()
    toggle = specs["lora.preconditioner"]
    assert toggle.kind is Kind.TOGGLE and toggle.choices == ("riemannian", "adaprelora")
    assert specs["model.base_model"].kind is Kind.PATH
    assert specs["sampling.prompts"].kind is Kind.LINES
    assert specs["optimizer.betas"].kind is Kind.NUMBERS
    assert specs["optimizer.extra_kwargs"].kind is Kind.JSON
    # parts: generated from part_specs(), labelled with the part, defaults as declared
    te = specs["model.text_encoder.train"]
    assert (te.label, te.group, te.tab, te.default) == (
        "CLIP-L text encoder",
        "Parts to train",
        "lora",
        False,
    )
    assert specs["model.unet.learning_rate"].kind is Kind.OPTIONAL_NUMBER
    assert specs["model.unet.learning_rate"].tab == "training"
    concepts = specs["data.concepts"]
    assert isinstance(concepts, ListSpec)
    assert [f.key for f in concepts.item_fields(2)][:2] == [
        "data.concepts.2.path",
        "data.concepts.2.recursive",
    ]
    flux = {s.key: s for s in form_fields("flux")}
    assert "model.text_encoder_2.train" not in flux  # T5 is always frozen: no switch
    assert flux["model.transformer.weight_dtype"].default == "bfloat16"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_round_trips_through_the_inputs(preset: Path) -> None:
    """What every input shows, read back, is the same config."""
    config = load_config(preset)
    form = ConfigForm(config)
    shown = {spec.key: form.get(spec.key) for spec in form.fields()}
    again = ConfigForm()
    again.load(TrainConfig.model_validate({"model": {"family": config.model.family}}))
    for _ in range(form.count("data.concepts")):
        again.add_item("data.concepts")
    for _ in range(form.count("data.validation.concepts")):
        again.add_item("data.validation.concepts")
    for key, value in shown.items():
        again.set(key, value)
    assert again.issues() == [] or all("does not exist" in i.message for i in again.issues())
    assert load_config(raw=again.raw()) == config


def test_tricky_values_as_inputs_show_them() -> None:
    config = load_config(
        raw={
            "model": {"unet": {"learning_rate": 5e-5}},
            "lora": {"precondition_damping_floor": 1e-9},
            "optimizer": {"betas": [0.8, 0.99], "extra_kwargs": {"d_coef": 0.5}},
            "data": {"extra_resolutions": [512, 768]},
            "sampling": {"prompts": ["a cat, sitting", "  a dog"]},
        }
    )
    form = ConfigForm(config)
    assert form.get("model.unet.learning_rate") == "5e-05"
    assert form.get("model.text_encoder.learning_rate") == ""
    assert form.get("lora.precondition_damping_floor") == "1e-09"
    assert form.get("optimizer.betas") == "0.8, 0.99"
    assert form.get("optimizer.extra_kwargs") == '{"d_coef": 0.5}'
    assert form.get("data.extra_resolutions") == "512, 768"
    assert form.get("sampling.prompts") == "a cat, sitting\n  a dog"
    assert form.config() == config
    form.set("sampling.prompts", "one\n\n two  \n")
    form.set("model.unet.learning_rate", "  ")
    form.set("optimizer.extra_kwargs", "")
    assert form.config().sampling.prompts == ["one", " two"]
    assert form.config().model.unet.learning_rate is None
    assert form.config().optimizer.extra_kwargs == {}


# -- messages: the CLI's own --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("lora.rank", "-4"),
        ("lora.rank", "abc"),
        ("lora.rank", ""),
        ("training.batch_size", "1.5"),
        ("optimizer.learning_rate", "0"),
        ("data.resolution", "1000"),
        ("optimizer.extra_kwargs", "[1]"),
    ],
)
def test_invalid_text_gets_the_cli_message(key: str, text: str) -> None:
    form = _form()
    form.set(key, text)
    assert [(i.key, i.message) for i in form.issues()] == [(key, _cli_message({}, key, text))]
    with pytest.raises(ConfigError):
        form.config()


def test_list_element_messages_mark_their_list() -> None:
    form = _form()
    form.set("data.extra_resolutions", "512, 700")
    (issue,) = form.issues()
    assert issue.key == "data.extra_resolutions" and issue.tab == "data"
    assert issue.message == _cli_message({}, "data.extra_resolutions", "[512, 700]")


def test_section_checks_mark_the_field_they_name() -> None:
    form = _form()
    form.set("model.unet.train", False)
    (issue,) = form.issues()
    assert issue.message.startswith("nothing to train: set model.unet.train")
    assert issue.key == "model.unet.train" and issue.tab == "lora"


def test_missing_concept_folder_is_worded_like_the_run(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    form = _form()
    form.add_item("data.concepts", path=str(missing))
    (issue,) = form.issues()
    with pytest.raises(UserError) as run:
        config = load_config(raw=form.raw())
        scan_concepts(
            config.data.concepts, config.data, key="data.concepts", step=64, index=ScanIndex(None)
        )
    assert (issue.key, issue.message) == ("data.concepts.0.path", str(run.value))
    form.set("data.concepts.0.path", str(tmp_path))
    assert form.issues() == []


def test_an_added_concept_needs_its_folder() -> None:
    form = _form()
    index = form.add_item("data.concepts")
    assert (index, form.count("data.concepts")) == (0, 1)
    (issue,) = form.issues()
    assert issue.key == "data.concepts.0.path"
    assert issue.message == 'data.concepts.0.path = "": String should have at least 1 character'
    assert form.item_has_issue("data.concepts", 0)
    form.add_item("data.concepts", path="b", repeats=2)
    form.remove_item("data.concepts", 0)
    assert form.count("data.concepts") == 1
    assert (form.get("data.concepts.0.path"), form.get("data.concepts.0.repeats")) == ("b", "2")


# -- applicability and the toggle ---------------------------------------------------------------


def test_riemannian_tick_maps_onto_the_one_switch() -> None:
    form = _form()
    key = "lora.preconditioner"
    damping, probes = "lora.precondition_damping", "lora.adaprelora_probes"
    assert not form.ticked(key) and not form.applies(damping) and not form.applies(probes)
    form.tick(key, True)
    assert form.config().lora.preconditioner == "riemannian"
    assert form.applies(damping) and not form.applies(probes)
    form.set(key, "adaprelora")
    assert form.applies(damping) and form.applies(probes)
    form.tick(key, False)
    assert form.config().lora.preconditioner == "none" and not form.applies(damping)
    form.tick(key, True)  # the method picked last comes back
    assert form.config().lora.preconditioner == "adaprelora"


@pytest.mark.parametrize(
    ("key", "sibling", "applies", "not_applies"),
    [
        ("optimizer.momentum", "optimizer.name", "sgd", "adamw"),
        ("optimizer.betas", "optimizer.name", "prodigy", "sgd"),
        ("scheduler.cycles", "scheduler.name", "cosine_with_restarts", "cosine"),
        ("data.unmasked_weight", "data.masked_training", True, False),
        ("model.text_encoder.learning_rate", "model.text_encoder.train", True, False),
    ],
)
def test_fields_apply_as_declared(key: str, sibling: str, applies: Any, not_applies: Any) -> None:
    form = _form()
    form.set(sibling, applies)
    assert form.applies(key)
    form.set(sibling, not_applies)
    assert not form.applies(key)


def test_concept_fields_apply_per_concept() -> None:
    form = _form()
    form.add_item("data.concepts", path="a")
    form.add_item("data.concepts", path="b", caption_source="prompt")
    assert form.applies("data.concepts.0.caption_extension")
    assert not form.applies("data.concepts.0.prompt")
    assert form.applies("data.concepts.1.prompt")
    assert not form.applies("data.concepts.1.caption_extension")


def test_family_switch_brings_the_family_fields() -> None:
    form = _form()
    changes = []
    form.subscribe(changes.append)
    form.set("lora.rank", "8")
    form.set("model.family", "flux")
    assert changes[-1].structure and form.family == "flux"
    keys = {spec.key for spec in form.fields()}
    assert "model.transformer.train" in keys and "model.unet.train" not in keys
    assert form.spec("output.format").choices == ("kohya", "diffusers", "comfyui")
    t5 = {key for key in keys if key.startswith("model.text_encoder_2.")}
    assert t5 == {"model.text_encoder_2.weight_dtype"}  # always frozen: only its dtype
    assert not form.applies("model.shift")
    form.set("model.timestep_shift", "fixed")
    assert form.applies("model.shift")
    config = form.config()
    assert config.model.family == "flux" and config.lora.rank == 8
    assert config.model.transformer.weight_dtype == "bfloat16"
    form.set("output.format", "comfyui")
    form.set("model.family", "sdxl")
    assert form.config().model == FAMILIES["sdxl"][0]()
    assert form.spec("output.format").choices == ("kohya", "diffusers")
    assert form.config().output.format == "kohya"  # SDXL has no ComfyUI layout


# -- presets, files, Start ----------------------------------------------------------------------


def test_presets_builtin_and_saved(tmp_path: Path) -> None:
    library = PresetLibrary(user_dir=tmp_path / "mine")
    builtin = library.presets()
    assert [p.name for p in builtin] == [p.stem for p in PRESETS]
    assert all(p.builtin and p.title == p.name for p in builtin)
    config = load_config(raw={"lora": {"rank": 4, "preconditioner": "riemannian"}})
    saved = library.save("my run", config)
    assert saved.title == "my run (yours)" and library.presets()[-1] == saved
    written = json.loads(saved.path.read_text())
    assert written == {
        "config_version": config.config_version,
        "model": {"family": "sdxl"},
        "lora": {"rank": 4, "preconditioner": "riemannian"},
    }
    assert library.load(library.find("my run (yours)")) == config
    for bad in ("", "../x", "a/b"):
        with pytest.raises(UserError, match="preset name"):
            library.save(bad, config)
    with pytest.raises(UserError, match="built in"):
        library.delete(builtin[0])
    library.delete(saved)
    assert not saved.path.exists()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_saved_preset_reloads_the_same_config(preset: Path, tmp_path: Path) -> None:
    """Sparse files keep what differs from the defaults, including a part that keeps its
    declared default in part (text encoders that do not train but load in bfloat16)."""
    config = load_config(preset)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(sparse(config)))
    assert load_config(path) == config


def test_partly_given_parts_keep_their_declared_defaults() -> None:
    config = load_config(raw={"model": {"text_encoder": {"weight_dtype": "bfloat16"}}})
    assert config.model.text_encoder.train is False
    flux = load_config(raw={"model": {"family": "flux", "transformer": {"learning_rate": 1e-4}}})
    assert flux.model.transformer.weight_dtype == "bfloat16"


def test_an_empty_base_model_refuses_start_as_the_run_would_but_not_a_scan(
    tmp_path: Path, tiny_dataset_path: Path
) -> None:
    """A family switch leaves the base model empty (the other family's model would not load):
    Start says so before any work, in the run's own words; scanning the data still works."""
    app = _app(tmp_path)
    app.form.add_item("data.concepts", path=str(tiny_dataset_path))
    assert app.problems() == []
    app.form.set("model.family", "flux")
    with pytest.raises(UserError) as run:
        load_from_source("", folder=print, single_file=print, repo_id=print)
    problems = app.start()
    assert [(p.key, p.message) for p in problems] == [("model.base_model", str(run.value))]
    assert not app.run.running
    assert app.scan_data() == []
    deadline = time.monotonic() + 60
    while not app.scan.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.scan.error is None and app.scan.lines[0].startswith("data: 4 images")
    app.shutdown()


def test_scan_is_refused_while_the_config_is_invalid(tmp_path: Path) -> None:
    app = _app(tmp_path)
    app.form.add_item("data.concepts", path=str(tmp_path))
    app.form.set("lora.rank", "0")
    assert [p.key for p in app.scan_data()] == ["lora.rank"] and not app.scan.running


def test_start_is_refused_with_the_list(tmp_path: Path) -> None:
    app = TrainerApp(presets=PresetLibrary(user_dir=tmp_path), estimate_memory=False)
    app.form.set("lora.rank", "-4")
    app.form.set("training.batch_size", "abc")
    app.form.add_item("data.concepts", path=str(tmp_path / "missing"))
    problems = app.start()
    assert [p.key for p in problems] == [
        "model.base_model",
        "lora.rank",
        "training.batch_size",
        "data.concepts.0.path",
    ]
    assert problems[0].message == (
        "model.base_model is empty: set it to a diffusers folder, repo id or .safetensors file"
    )
    assert not app.run.running
    lines = app.pre_start_lines()
    assert lines[0] == "4 problems to fix before Start:"
    assert lines[1:] == [f"  {p.message}" for p in problems]
    with pytest.raises(ConfigError):
        app.export(tmp_path / "export.json")
    assert not (tmp_path / "export.json").exists()


def test_valid_config_shows_its_notes_and_exports(tmp_path: Path) -> None:
    app = _app(tmp_path)
    app.form.add_item("data.concepts", path=str(tmp_path))
    app.notes.append(lambda config: [f"estimated memory for rank {config.lora.rank}: 1 GiB"])
    assert app.pre_start_lines()[1:] == ["estimated memory for rank 16: 1 GiB"]
    app.form.tick("lora.preconditioner", True)
    app.export(tmp_path / "export.json")
    exported = load_config(tmp_path / "export.json")
    assert exported == app.form.config() and exported.lora.preconditioner == "riemannian"
    app.load_file(tmp_path / "export.json")
    assert app.form.config() == exported


def test_the_memory_estimate_is_shown_before_start(tmp_path: Path, tiny_model: Any) -> None:
    app = TrainerApp(presets=PresetLibrary(user_dir=tmp_path), estimate_delay=0)
    app.form.set("model.family", tiny_model.family)
    app.form.set("model.base_model", str(tiny_model.path))
    app.form.add_item("data.concepts", path=str(tmp_path))
    assert app.pre_start_lines()[-1] == "memory estimate: working it out…"
    deadline = time.monotonic() + 120
    app.poll_estimate()
    while app.estimate.running and time.monotonic() < deadline:
        app.poll_estimate()
        time.sleep(0.05)
    expected = memory_estimate_lines(app.form.config())
    assert expected[0].startswith("model shapes from the config files of")
    assert app.pre_start_lines()[-len(expected) - 1 :] == [
        "memory estimate:",
        *(f"  {line}" for line in expected),
    ]
    app.form.set("lora.rank", 4)  # another config: its own estimate, after the delay
    assert app.pre_start_lines()[-1] == "memory estimate: working it out…"
    app.shutdown()


def test_the_memory_estimate_waits_until_the_config_holds_still(tmp_path: Path) -> None:
    app = TrainerApp(presets=PresetLibrary(user_dir=tmp_path), estimate_delay=60)
    app.form.add_item("data.concepts", path=str(tmp_path))
    for rank in (1, 12, 128):  # typed one key at a time
        app.form.set("lora.rank", rank)
        app.pre_start_lines()
        assert not app.poll_estimate() and not app.estimate.running


def test_status_says_how_the_last_run_ended(tmp_path: Path) -> None:
    app = _app(tmp_path)
    app.form.add_item("data.concepts", path=str(tmp_path))
    assert app.status_lines() == [
        f"ready: sdxl, saving to {app.form.config().output.workspace_dir}"
    ]
    backup = tmp_path / "backups" / "step-000003"
    app.run.progress = RunProgress(state="stopped", step=3, last_backup=backup, notices=["data: 4"])
    assert app.status_lines()[:4] == [
        f"stopped at step 3; backup: {backup}",
        "Resume continues from the newest backup.",
        "data: 4",
        "",
    ]
    app.run.progress = RunProgress(state="failed", error="model.base_model: not found")
    assert app.status_lines()[0] == "error: model.base_model: not found"


def test_every_spec_kind_is_covered() -> None:
    kinds = {
        spec.kind
        for family in FAMILIES
        for spec in form_fields(family)
        if isinstance(spec, FieldSpec)
    }
    assert kinds == set(Kind)


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        ([], 1, "error: cannot open a window (no display name and no $DISPLAY environment "),
        (["--config-path", "nope.json"], 2, "error: nope.json: config file not found"),
    ],
)
def test_start_ui_without_a_desktop_says_so(arguments: list[str], code: int, message: str) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "start-ui.py"), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == code
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
