"""Open the trainer window (start-ui.py, the screenshot and benchmark scripts, the tests)."""

from __future__ import annotations

import tkinter
from pathlib import Path
from typing import TYPE_CHECKING

from modules.config.loading import load_config
from modules.ui.presets import PresetLibrary
from modules.ui.trainer_app import TrainerApp

if TYPE_CHECKING:
    from modules.ui.ctk.window import TrainWindow


class WindowError(Exception):
    """No window can open here (no display, no Tk)."""

    exit_code = 1


def open_window(
    *,
    config_path: str | Path | None = None,
    appearance: str = "system",
    app: TrainerApp | None = None,
    presets: PresetLibrary | None = None,
    estimate_memory: bool = True,
) -> TrainWindow:
    """The window, shown and drawn, with `config_path` (or the defaults) loaded; customtkinter
    is imported only here, so a missing display is one clear error."""
    if app is None:
        config = load_config(config_path) if config_path else None
        app = TrainerApp(config=config, presets=presets, estimate_memory=estimate_memory)
    try:
        import customtkinter as ctk

        from modules.ui.ctk.window import TrainWindow

        ctk.set_appearance_mode(appearance)
        window = TrainWindow(app)
    except tkinter.TclError as error:
        raise WindowError(
            f"cannot open a window ({error}); the GUI needs a desktop session or Xvfb, "
            "or train with scripts/train.py"
        ) from None
    window.update()
    return window
