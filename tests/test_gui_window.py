"""The trainer window's config side under a display (Xvfb): the LoRA tab's switch, presets
round-tripping, the family switch, concepts, invalid input, user presets and the data scan.
Runs started from the window are tests/test_gui_runs.py; the window is
tests/gui_window_fixtures.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import load_config
from modules.config.schema import TrainConfig
from modules.data.scan import ScanIndex, scan_concepts
from modules.errors import UserError
from modules.models.registry import FAMILIES
from modules.ui.fields import FieldSpec
from tests.gui_window_fixtures import load_through_button, pump, tiny_preset, type_into
from tests.helpers import REPO, run_cli

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh")]

PRESETS = sorted((REPO / "training_presets").glob("*.json"))


def test_riemannian_tick_in_the_lora_tab_exports_for_the_cli(window: Any, tmp_path: Path) -> None:
    lora = window.show_tab("lora")
    pump(window)
    assert window.tabview.get() == "LoRA"
    switch = lora.inputs["lora.preconditioner"]
    damping = lora.inputs["lora.precondition_damping"]
    assert switch.label.cget("text") == "Riemannian Preconditioning"
    assert not switch.var.get() and not damping.visible
    assert not switch.method.winfo_ismapped()
    switch.widget.toggle()  # what a click on the tick does
    pump(window)
    assert switch.method.winfo_ismapped() and switch.method.get() == "riemannian"
    assert damping.visible and damping.widget.winfo_ismapped()
    assert not lora.inputs["lora.adaprelora_probes"].visible
    assert "Riemannian Preconditioning" in switch.spec.tooltip()

    path = tmp_path / "exported.json"
    window.questions.next_path = str(path)
    window.export_button.invoke()
    assert json.loads(path.read_text())["lora"]["preconditioner"] == "riemannian"
    assert load_config(path) == window.app.form.config()
    printed = run_cli("--config-path", str(path), "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert TrainConfig.model_validate_json(printed.stdout) == window.app.form.config()

    switch.method._dropdown_callback("adaprelora")  # what picking it in the menu does
    pump(window)
    assert window.app.form.config().lora.preconditioner == "adaprelora"
    probes = lora.inputs["lora.adaprelora_probes"]
    assert not probes.visible  # an advanced setting
    window.advanced.toggle()
    pump(window)
    assert probes.visible and probes.widget.winfo_ismapped()
    window.advanced.toggle()
    switch.widget.toggle()
    pump(window)
    assert window.app.form.config().lora.preconditioner == "none" and not damping.visible


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_builtin_preset_round_trips_through_the_window(
    window: Any, preset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every input shows the preset's value, and Export writes the same config."""
    monkeypatch.chdir(tmp_path)  # the presets' relative folders are made here
    window.choose_preset(preset.stem)
    pump(window)
    assert window.app.preset.path == preset
    shown = 0
    for tab in window.tabs.values():
        for field in tab.all_inputs():
            value = window.app.form.get(field.spec.key)
            if field.spec.kind.value == "lines":
                assert field.widget.get("1.0", "end-1c") == value
            elif field.spec.kind.value == "toggle":
                assert bool(field.var.get()) == window.app.form.ticked(field.spec.key)
            else:
                assert field.var.get() == value, field.spec.key
            shown += 1
    assert shown >= 80
    top_level = {spec.key for spec in window.app.form.specs if isinstance(spec, FieldSpec)}
    assert top_level <= shown_keys(window)  # the preset's family's inputs, and only those
    assert shown_keys(window) <= form_keys(window)
    assert window.tabs["model"].inputs["model.family"].var.get() == load_config(preset).model.family
    data = load_config(preset).data
    for concept in [*data.concepts, *data.validation.concepts]:
        Path(concept.path).mkdir(parents=True, exist_ok=True)
    pump(window)
    assert window.app.problems() == []
    path = tmp_path / "exported.json"
    window.questions.next_path = str(path)
    window.export_button.invoke()
    assert load_config(path) == load_config(preset)


def shown_keys(window: Any) -> set[str]:
    """The config keys of every input the window holds (all tabs)."""
    return {field.spec.key for tab in window.tabs.values() for field in tab.all_inputs()}


def form_keys(window: Any) -> set[str]:
    """The config keys the form has fields for (list items included)."""
    return {spec.key for spec in window.app.form.fields()}


def test_family_switch_rebuilds_the_model_tab(window: Any) -> None:
    """Choosing flux in the family menu brings Flux's parts and options on every tab and takes
    SDXL's away (its widgets are gone, not hidden); choosing sdxl again brings them back."""
    sdxl = shown_keys(window)
    assert sdxl == form_keys(window)
    old_unet = window.tabs["lora"].inputs["model.unet.train"].widget
    model = window.show_tab("model")
    model.inputs["model.family"].widget._dropdown_callback("flux")
    pump(window)
    assert window.app.form.family == "flux"
    flux = shown_keys(window)
    assert flux == form_keys(window)
    assert {"model.prediction_type", "model.unet.train", "model.unet.weight_dtype"} <= sdxl - flux
    assert {"model.guidance", "model.timestep_sampling", "model.quantize_base"} <= flux - sdxl
    assert not old_unet.winfo_exists()

    # one train / learning rate / weight dtype input per part, labelled with the part's name
    model = window.tabs["model"]
    assert model.inputs["model.family"].var.get() == "flux"
    specs = FAMILIES["flux"][0].part_specs()
    for setting, tab in [
        ("train", "lora"),
        ("learning_rate", "training"),
        ("weight_dtype", "model"),
    ]:
        inputs = window.tabs[tab].inputs
        shown = {
            key.split(".")[1]: inputs[key].label.cget("text")
            for key in inputs
            if key.startswith("model.") and key.endswith(f".{setting}")
        }
        trainable = [s for s in specs if s.trainable or setting == "weight_dtype"]
        assert shown == {s.name: s.label for s in trainable}, setting
    assert window.tabs["model"].inputs["model.transformer.weight_dtype"].var.get() == "bfloat16"

    window.show_tab("model")
    pump(window)
    guidance = model.inputs["model.guidance"]
    assert guidance.visible and guidance.widget.winfo_ismapped()
    assert not model.inputs["model.shift"].visible
    model.inputs["model.timestep_shift"].widget._dropdown_callback("fixed")
    window.advanced.toggle()
    pump(window)
    assert (
        model.inputs["model.shift"].visible and model.inputs["model.shift"].widget.winfo_ismapped()
    )
    window.advanced.toggle()
    pump(window)
    layouts = window.tabs["general"].inputs["output.format"].widget
    assert layouts.winfo_exists() and layouts.cget("values") == ["kohya", "diffusers", "comfyui"]

    window.tabs["model"].inputs["model.family"].widget._dropdown_callback("sdxl")
    pump(window)
    assert shown_keys(window) == sdxl
    layouts = window.tabs["general"].inputs["output.format"].widget
    assert layouts.cget("values") == ["kohya", "diffusers"]
    assert window.app.form.config().model == FAMILIES["sdxl"][0]()


def test_concepts_are_added_edited_and_removed(window: Any, tmp_path: Path) -> None:
    data = window.show_tab("data")
    (concepts, _) = data.lists
    concepts.add_button.invoke()
    pump(window)
    assert window.app.form.count("data.concepts") == 1
    folder = concepts.inputs[0]
    assert folder.spec.key == "data.concepts.0.path" and folder.messages
    window.questions.next_path = str(tmp_path)
    (browse,) = folder.buttons
    assert browse.cget("text") == "Folder…"
    browse.invoke()
    pump(window)
    assert window.app.form.config().data.concepts[0].path == str(tmp_path)
    repeats = next(f for f in concepts.inputs if f.spec.key.endswith(".repeats"))
    type_into(window, repeats, "3")
    assert window.app.form.config().data.concepts[0].repeats == 3
    assert concepts.item_buttons[0].cget("text") == f"1.  {tmp_path}"
    concepts.add_button.invoke()
    pump(window)
    concepts.item_buttons[0].invoke()
    pump(window)
    assert concepts.selected == 0 and concepts.inputs[0].var.get() == str(tmp_path)
    concepts.remove_button.invoke()
    pump(window)
    assert window.app.form.count("data.concepts") == 1
    assert window.app.form.get("data.concepts.0.path") == ""


def test_invalid_values_are_marked_and_start_is_refused(
    window: Any, tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    missing = tmp_path / "no-such-folder"
    load_through_button(window, tiny_preset(tmp_path, tiny_sdxl_path, missing))
    lora, training = window.show_tab("lora"), window.show_tab("training")
    rank, batch = lora.inputs["lora.rank"], training.inputs["training.batch_size"]
    type_into(window, rank, "-4")
    type_into(window, batch, "abc")
    assert rank.messages == ["lora.rank = -4 is out of range; allowed: >= 1 and <= 1024"]
    assert rank.error.cget("text") == rank.messages[0] and rank.error.grid_info()
    assert batch.messages == [
        'training.batch_size = "abc": Input should be a valid integer, unable to parse string '
        "as an integer"
    ]
    folder = window.show_tab("data").lists[0].inputs[0]
    assert folder.messages == [f"data.concepts.0.path: folder '{missing}' does not exist"]

    window.panel.start_button.invoke()
    pump(window)
    assert not window.app.run.running
    (dialog,) = window.messages
    assert dialog.title() == "Cannot start"
    assert dialog.message.splitlines()[2:] == [
        f"[LoRA] {rank.messages[0]}",
        f"[Training] {batch.messages[0]}",
        f"[Data] {folder.messages[0]}",
    ]
    # what Start would say (after how an earlier run in this window ended, when there was one)
    assert "3 problems to fix before Start:" in window.panel.status_lines

    # the CLI says the same about the folder, with the values fixed that it reads first
    type_into(window, rank, "4")
    type_into(window, batch, "2")
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(window.app.form.raw()))
    cli = run_cli("--config-path", str(raw))
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines()[-1] == f"error: {folder.messages[0]}"


def test_user_presets_are_saved_offered_and_deleted(window: Any) -> None:
    window.show_tab("lora").inputs["lora.rank"].var.set("8")
    window.questions.next_text = "rank eight"
    window.save_preset_button.invoke()
    pump(window)
    assert window.preset_menu.get() == "rank eight (yours)"
    assert "rank eight (yours)" in window.preset_menu.cget("values")
    window.app.form.load(TrainConfig())
    window.choose_preset("rank eight (yours)")
    pump(window)
    assert window.app.form.config().lora.rank == 8
    assert window.delete_preset_button.cget("state") == "normal"
    window.delete_preset_button.invoke()
    pump(window)
    assert "rank eight (yours)" not in window.preset_menu.cget("values")


def test_scan_shows_the_data_report(window: Any, tmp_path: Path, tiny_dataset_path: Path) -> None:
    window.app.form.add_item("data.concepts", path=str(tiny_dataset_path))
    window.show_tab("data")
    window.scan_button.invoke()
    pump(window, until=lambda: not window.app.scan.running, timeout=120)
    pump(window)
    report = window.scan_report.get("1.0", "end-1c").splitlines()
    assert report[0] == "data: 4 images in 1 concept, 0 files skipped"
    assert report[-1] == "  buckets at 1024 px: 1024x1024: 4"

    window.app.form.set("data.concepts.0.path", str(tmp_path))  # a folder without images
    with pytest.raises(UserError) as run:
        config = window.app.form.config()
        scan_concepts(
            config.data.concepts, config.data, key="data.concepts", step=64, index=ScanIndex(None)
        )
    window.scan_button.invoke()
    pump(window, until=lambda: not window.app.scan.running, timeout=120)
    pump(window)
    assert window.scan_report.get("1.0", "end-1c") == f"error: {run.value}"
