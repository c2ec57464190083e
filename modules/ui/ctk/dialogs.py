"""Dialogs: messages that leave the window usable, and the file / name questions (behind one
object, so tests can answer them without a desktop)."""

from __future__ import annotations

from collections.abc import Callable
from tkinter import filedialog
from typing import Any

import customtkinter as ctk

from modules.config.fields import PathInput


class MessageDialog(ctk.CTkToplevel):
    """A message with buttons; not modal, so the main window keeps running (and polling)."""

    def __init__(
        self,
        master: Any,
        *,
        title: str,
        message: str,
        buttons: dict[str, Callable[[], None] | None] | None = None,
        on_close: Callable[[MessageDialog], None] | None = None,
    ) -> None:
        super().__init__(master)
        self.title(title)
        self.message = message
        self.resizable(False, False)
        self.transient(master)
        self._on_close = on_close
        ctk.CTkLabel(
            self, text=message, justify="left", anchor="w", wraplength=560, font=("", 13)
        ).pack(padx=20, pady=(18, 10), fill="x")
        row = ctk.CTkFrame(self, fg_color="transparent")
        row.pack(padx=16, pady=(0, 14), anchor="e")
        self.buttons: dict[str, ctk.CTkButton] = {}
        for text, action in (buttons or {"OK": None}).items():
            button = ctk.CTkButton(
                row, text=text, width=110, command=lambda action=action: self._press(action)
            )
            button.pack(side="left", padx=4)
            self.buttons[text] = button
        self.protocol("WM_DELETE_WINDOW", lambda: self._press(None))
        self.lift()

    def _press(self, action: Callable[[], None] | None) -> None:
        if self._on_close is not None:
            self._on_close(self)
        self.destroy()
        if action is not None:
            action()


class Questions:
    """What the window asks the user through the desktop's dialogs (tests answer instead)."""

    def open_config(self, parent: Any) -> str | None:
        return (
            filedialog.askopenfilename(
                parent=parent,
                title="Load a config or preset",
                filetypes=[("JSON config", "*.json"), ("all files", "*")],
            )
            or None
        )

    def save_config(self, parent: Any) -> str | None:
        return (
            filedialog.asksaveasfilename(
                parent=parent,
                title="Export the config",
                defaultextension=".json",
                filetypes=[("JSON config", "*.json")],
            )
            or None
        )

    def path(self, parent: Any, what: PathInput, current: str) -> str | None:
        if what.kind == "folder":
            return filedialog.askdirectory(parent=parent, initialdir=current or None) or None
        types = [(f"{s} files", f"*{s}") for s in what.suffixes] + [("all files", "*")]
        return filedialog.askopenfilename(parent=parent, filetypes=types) or None

    def text(self, parent: Any, *, title: str, prompt: str) -> str | None:
        return ctk.CTkInputDialog(title=title, text=prompt).get_input() or None
