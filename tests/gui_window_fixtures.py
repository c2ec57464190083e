"""The trainer window under a display (Xvfb), for the GUI test modules: one window per test
process (Tk allows one root), reset between tests by `fresh`; a Tk callback error fails the test
that caused it. Registered as a plugin in tests/conftest.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from modules.config.schema import TrainConfig
from modules.ui.presets import PresetLibrary
from tests.helpers import tiny_config


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


@pytest.fixture(scope="session")
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


@pytest.fixture
def fresh(window: Any) -> Iterator[None]:
    """Each test starts from the defaults with no dialog open, and ends without a Tk error
    (the GUI modules use it for every test: `pytest.mark.usefixtures("fresh")`)."""
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


def wait_for_run(window: Any, timeout: float = 300) -> None:
    pump(window, until=lambda: not window.app.run.running, timeout=timeout)
    pump(window)
