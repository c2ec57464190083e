"""The trainer window under a display (Xvfb): the LoRA tab's switch, presets, invalid input,
and runs started, stopped and resumed from it. One window per test process (Tk allows one
root), reset between tests; a Tk callback error fails the test that caused it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import load_config
from modules.config.schema import TrainConfig
from modules.data.scan import ScanIndex, scan_concepts
from modules.errors import UserError
from modules.lora.formats import read_lora_metadata
from modules.models.registry import FAMILIES
from modules.ui.fields import FieldSpec
from modules.ui.presets import PresetLibrary
from tests.helpers import REPO, run_cli, tiny_config

pytestmark = pytest.mark.gui

PRESETS = sorted((REPO / "training_presets").glob("*.json"))


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """$DISPLAY when set, else a private Xvfb; skips where neither exists."""
    from modules.ui.ctk.display import NoDisplayError, virtual_display

    try:
        with virtual_display() as name:
            yield name
    except NoDisplayError as error:
        pytest.skip(f"{error}; .ci/run installs Xvfb")


class Answers:
    """Stands in for the desktop's file and name dialogs."""

    def __init__(self) -> None:
        self.next_path: str | None = None
        self.next_text: str | None = None

    def open_config(self, parent: Any) -> str | None:
        return self.next_path

    def save_config(self, parent: Any) -> str | None:
        return self.next_path

    def path(self, parent: Any, what: Any, current: str) -> str | None:
        return self.next_path

    def text(self, parent: Any, *, title: str, prompt: str) -> str | None:
        return self.next_text


@pytest.fixture(scope="module")
def window(display: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        from modules.ui.ctk.launch import WindowError, open_window
    except ImportError as error:  # a Python built without tkinter
        pytest.skip(f"no tkinter: {error}")
    presets = PresetLibrary(user_dir=tmp_path_factory.mktemp("user-presets"))
    try:
        window = open_window(presets=presets, estimate_memory=False)
    except WindowError as error:
        pytest.skip(str(error))
    window.questions = Answers()
    window.callback_errors = []
    window.report_callback_exception = lambda *info: window.callback_errors.append(info)
    window.build_all()
    yield window
    window.app.shutdown(timeout=30)
    window.destroy()


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts from the defaults with no dialog open, and ends without a Tk error."""
    if "window" not in request.fixturenames:
        yield
        return
    window = request.getfixturevalue("window")
    window.app.form.load(TrainConfig())
    pump(window)
    yield
    for dialog in list(window.messages):
        dialog.destroy()
    window.messages.clear()
    errors = list(window.callback_errors)
    window.callback_errors.clear()
    assert not errors, f"Tk callback error: {errors[0][1]!r}"


def pump(window: Any, until: Callable[[], bool] | None = None, timeout: float = 5) -> None:
    """Run the event loop (after callbacks, redraws) until `until()`, or for a moment."""
    deadline = time.monotonic() + (timeout if until is not None else 0.05)
    while True:
        window.update()
        if until is not None and until():
            return
        if time.monotonic() > deadline:
            assert until is None, "timed out waiting for the window"
            return
        time.sleep(0.02)


def type_into(window: Any, field: Any, text: str) -> None:
    """Replace an entry's text as typing does (through the widget, not the form)."""
    field.widget.delete(0, "end")
    field.widget.insert(0, text)
    pump(window)


def tiny_preset(tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path, **sections: Any):
    raw = tiny_config(tiny_sdxl_path, tiny_dataset_path, tmp_path / "ws", **sections)
    raw["data"]["workers"] = 0
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(raw))
    return path


def load_through_button(window: Any, path: Path) -> None:
    window.questions.next_path = str(path)
    window.load_button.invoke()
    pump(window)


# -- the config ---------------------------------------------------------------------------------


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
    assert window.panel.status_lines[0] == "3 problems to fix before Start:"

    # the CLI says the same about the folder, with the values fixed that it reads first
    type_into(window, rank, "4")
    type_into(window, batch, "2")
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(window.app.form.raw()))
    cli = run_cli("--config-path", str(raw))
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines()[-1] == f"error: {folder.messages[0]}"


# -- running ------------------------------------------------------------------------------------


def wait_for_run(window: Any, timeout: float = 300) -> None:
    pump(window, until=lambda: not window.app.run.running, timeout=timeout)
    pump(window)


def test_a_run_error_is_a_dialog_then_the_next_run_finishes(
    window: Any, tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    """A base model that is not there fails in the run (not before Start): the window shows the
    CLI's line and stays usable; with the path fixed, the next run trains to the end."""
    preset = tiny_preset(
        tmp_path,
        tmp_path / "no-model",
        tiny_dataset_path,
        sampling={"prompts": ["a red circle", "a blue square"], "steps": 2, "at_end": True},
        training={"max_steps": 4},
    )
    load_through_button(window, preset)
    panel = window.panel
    panel.start_button.invoke()
    pump(window)
    assert window.app.run.running and panel.start_button.cget("state") == "disabled"
    wait_for_run(window)
    (dialog,) = window.messages
    assert dialog.title() == "The run stopped with an error"
    assert "no-model" in dialog.message and "\n" not in dialog.message
    assert panel.status_lines[0] == f"error: {dialog.message}"
    assert panel.start_button.cget("state") == "normal"
    dialog.buttons["OK"].invoke()
    pump(window)
    assert not window.messages

    type_into(window, window.show_tab("model").inputs["model.base_model"], str(tiny_sdxl_path))
    panel.start_button.invoke()
    wait_for_run(window)
    assert not window.messages, window.messages[0].message
    workspace = tmp_path / "ws"
    assert (workspace / "test-lora.safetensors").is_file()
    assert panel.progress_bar.get() == 1.0
    assert panel.summary.cget("text").startswith("step 4/4 · loss ")
    folder = workspace / "samples" / "000004"
    assert panel.samples.shown == (folder / "00.png", folder / "01.png")
    assert all(path.is_file() for path in panel.samples.shown)
    assert panel.samples.title.cget("text") == "Samples at step 4"
    # the plot catches up within its redraw interval
    pump(window, until=lambda: len(panel.plot.smoothed.get_xdata()) == 4)
    assert list(panel.plot.smoothed.get_xdata()) == [1, 2, 3, 4]
    assert panel.status_lines[0] == (
        f"finished after 4 steps; LoRA: {workspace / 'test-lora.safetensors'}"
    )
    assert any(line.startswith("data: 4 images") for line in panel.status_lines)


def test_flux_chosen_in_the_window_trains_through_the_same_run(
    window: Any,
    tmp_path: Path,
    tiny_sdxl_path: Path,
    tiny_flux_path: Path,
    tiny_dataset_path: Path,
) -> None:
    """An SDXL config loaded, then flux chosen in the family menu and its model set up in the
    Model tab's inputs: Start trains a Flux LoRA (progress, samples) as it trains SDXL's."""
    preset = tiny_preset(
        tmp_path,
        tiny_sdxl_path,
        tiny_dataset_path,
        sampling={"prompts": ["a red circle"], "steps": 2, "at_end": True},
        training={"max_steps": 3},
    )
    load_through_button(window, preset)
    window.show_tab("model").inputs["model.family"].widget._dropdown_callback("flux")
    pump(window)
    model = window.tabs["model"]
    assert model.inputs["model.base_model"].var.get() == ""  # SDXL's model is not Flux's
    type_into(window, model.inputs["model.base_model"], str(tiny_flux_path))
    type_into(window, model.inputs["model.t5_max_length"], "16")  # fast steps on the CPU
    for part in FAMILIES["flux"][0].part_specs():
        model.inputs[f"model.{part.name}.weight_dtype"].widget._dropdown_callback("float32")
    pump(window)
    assert window.app.problems() == []
    config = window.app.form.config()
    assert config.model.family == "flux" and config.model.trained_parts() == ["transformer"]

    panel = window.panel
    panel.start_button.invoke()
    wait_for_run(window)
    assert not window.messages, window.messages[0].message
    workspace = tmp_path / "ws"
    lora = workspace / "test-lora.safetensors"
    assert read_lora_metadata(lora)["ss_base_model_version"] == "flux1"
    assert load_config(workspace / "config.json") == config
    assert panel.progress_bar.get() == 1.0
    assert panel.summary.cget("text").startswith("step 3/3 · loss ")
    assert panel.samples.shown == (workspace / "samples" / "000003" / "00.png",)
    assert panel.status_lines[0] == f"finished after 3 steps; LoRA: {lora}"


def test_stop_writes_a_backup_and_resume_finishes(
    window: Any, tmp_path: Path, tiny_sdxl_path: Path, tiny_dataset_path: Path
) -> None:
    preset = tiny_preset(
        tmp_path,
        tiny_sdxl_path,
        tiny_dataset_path,
        sampling={"prompts": ["a red circle"], "steps": 2, "at_end": False},
        training={"max_steps": 1000},
    )
    load_through_button(window, preset)
    panel = window.panel
    panel.start_button.invoke()
    pump(window, until=lambda: window.app.run.progress.step >= 1, timeout=300)
    assert panel.sample_button.cget("state") == "normal"
    panel.sample_button.invoke()
    panel.backup_button.invoke()
    progress = window.app.run.progress
    pump(window, until=lambda: panel.samples.shown and progress.last_backup, timeout=120)
    assert progress.last_backup.parent == tmp_path / "ws" / "backups"
    panel.stop_button.invoke()
    wait_for_run(window)
    progress = window.app.run.progress
    assert progress.state == "stopped" and 1 <= progress.step < 1000
    backups = sorted((tmp_path / "ws" / "backups").iterdir())
    assert (
        backups[-1]
        == progress.last_backup
        == tmp_path / "ws" / "backups" / (f"step-{progress.step:06d}")
    )
    assert (backups[-1] / "state.pt").is_file()
    assert panel.status_lines[:2] == [
        f"stopped at step {progress.step}; backup: {backups[-1]}",
        "Resume continues from the newest backup.",
    ]
    assert not (tmp_path / "ws" / "test-lora.safetensors").exists()

    stopped = progress.step
    type_into(window, window.show_tab("training").inputs["training.max_steps"], str(stopped + 2))
    panel.resume_button.invoke()
    wait_for_run(window)
    assert not window.messages, window.messages[0].message
    assert window.app.run.progress.state == "finished"
    assert window.app.run.progress.step == stopped + 2 and panel.progress_bar.get() == 1.0
    assert (tmp_path / "ws" / "test-lora.safetensors").is_file()


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
