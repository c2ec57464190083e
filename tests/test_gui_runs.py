"""Runs started, stopped and resumed from the trainer window under a display (Xvfb): errors
as dialogs, a Flux run chosen in the window, Stop with a backup and Resume. The window is
tests/gui_window_fixtures.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modules.config.loading import load_config
from modules.lora.formats import read_lora_metadata
from modules.models.registry import FAMILIES
from tests.gui_window_fixtures import (
    load_through_button,
    pump,
    tiny_preset,
    type_into,
    wait_for_run,
)

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("fresh")]


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
