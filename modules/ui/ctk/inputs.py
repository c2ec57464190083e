"""One input per field kind, bound to the form, with the field's help as its tooltip.

An input shows what the form holds and hands every edit straight back to it; whether a value
is valid, and whether the field applies, is the form's business.
"""

from __future__ import annotations

import tkinter
from collections.abc import Callable
from typing import Any

import customtkinter as ctk

from modules.config.fields import PathInput
from modules.ui.fields import FieldSpec, Kind
from modules.ui.form import ConfigForm

ERROR_COLOR = ("#b3261e", "#f2766b")
MUTED_COLOR = ("gray40", "gray65")
LABEL_WIDTH = 230


class Tooltip:
    """A small window with `text()` after the pointer rests on the widget for a moment."""

    def __init__(self, widget: Any, text: Callable[[], str], delay_ms: int = 450) -> None:
        self.widget, self.text, self.delay_ms = widget, text, delay_ms
        self._pending: str | None = None
        self._window: tkinter.Toplevel | None = None
        widget.bind("<Enter>", self._schedule, add="+")
        widget.bind("<Leave>", self.hide, add="+")
        widget.bind("<ButtonPress>", self.hide, add="+")

    def _schedule(self, _event: Any = None) -> None:
        self._cancel()
        self._pending = self.widget.after(self.delay_ms, self.show)

    def _cancel(self) -> None:
        if self._pending is not None:
            self.widget.after_cancel(self._pending)
            self._pending = None

    def show(self) -> None:
        self._pending = None
        if self._window is not None or not self.widget.winfo_exists():
            return
        x = self.widget.winfo_rootx() + 16
        y = self.widget.winfo_rooty() + self.widget.winfo_height() + 4
        self._window = window = tkinter.Toplevel(self.widget)
        window.wm_overrideredirect(True)
        window.wm_geometry(f"+{x}+{y}")
        tkinter.Label(
            window,
            text=self.text(),
            justify="left",
            wraplength=460,
            background="#fffbe6",
            foreground="#202020",
            relief="solid",
            borderwidth=1,
            padx=8,
            pady=6,
        ).pack()

    def hide(self, _event: Any = None) -> None:
        self._cancel()
        if self._window is not None:
            self._window.destroy()
            self._window = None


class FieldInput:
    """A field's row in a grid: label, input, and the CLI's message below when invalid."""

    def __init__(
        self,
        parent: Any,
        *,
        row: int,
        spec: FieldSpec,
        form: ConfigForm,
        pick_path: Callable[[PathInput, str], str | None],
    ) -> None:
        self.spec, self.form, self.parent, self.row = spec, form, parent, row
        self._pick_path = pick_path
        self._writing = False  # set while the form's value is written into the widget
        self.visible = True
        self.messages: list[str] = []
        self.label = ctk.CTkLabel(parent, text=spec.label, anchor="w", width=LABEL_WIDTH)
        self.label.grid(row=row, column=0, sticky="nw", padx=(12, 8), pady=(5, 0))
        self.frame = ctk.CTkFrame(parent, fg_color="transparent")
        self.frame.grid(row=row, column=1, sticky="ew", padx=(0, 12), pady=(3, 0))
        self.frame.grid_columnconfigure(0, weight=1)
        self.error: ctk.CTkLabel | None = None
        self.var: tkinter.Variable | None = None
        self.buttons: list[ctk.CTkButton] = []  # a path's File… / Folder… pickers
        self.widget = self._build()
        self.refresh()
        self.tooltips = [Tooltip(self.label, spec.tooltip), Tooltip(self.widget, spec.tooltip)]

    # -- building -------------------------------------------------------------------------------

    def _build(self) -> Any:
        kind = self.spec.kind
        if kind is Kind.BOOL:
            self.var = tkinter.BooleanVar(self.frame)
            widget = ctk.CTkCheckBox(
                self.frame, text="", width=24, variable=self.var, command=self._ticked
            )
            widget.grid(row=0, column=0, sticky="w")
            return widget
        if kind is Kind.CHOICE:
            return self._menu(self.spec.choices, lambda value: self._edited(value))
        if kind is Kind.TOGGLE:
            self.var = tkinter.BooleanVar(self.frame)
            box = ctk.CTkCheckBox(
                self.frame, text="", width=24, variable=self.var, command=self._toggled
            )
            box.grid(row=0, column=0, sticky="w")
            self.method = ctk.CTkOptionMenu(
                self.frame,
                values=list(self.spec.choices),
                command=lambda value: self._edited(value),
                dynamic_resizing=False,
                width=180,
            )
            self.method.grid(row=0, column=1, sticky="w", padx=(8, 0))
            self.frame.grid_columnconfigure(0, weight=0)
            self.frame.grid_columnconfigure(1, weight=1)
            return box
        if kind is Kind.LINES:
            widget = ctk.CTkTextbox(self.frame, height=72, wrap="none")
            widget.grid(row=0, column=0, sticky="ew")
            widget.bind("<<Modified>>", self._text_modified)
            return widget
        self.var = tkinter.StringVar(self.frame)
        short = kind in (Kind.NUMBER, Kind.OPTIONAL_NUMBER, Kind.NUMBERS)
        widget = ctk.CTkEntry(self.frame, textvariable=self.var, width=200)
        widget.grid(row=0, column=0, sticky="w" if short else "ew")
        self.var.trace_add("write", lambda *_: self._edited(self.var.get()))
        declared = self.spec.path_input
        if declared is not None:
            kinds = ("file", "folder") if declared.kind == "file_or_folder" else (declared.kind,)
            for column, what in enumerate(kinds, start=1):
                button = ctk.CTkButton(
                    self.frame,
                    text=f"{what.capitalize()}…",
                    width=72,
                    command=lambda what=what: self._browse(
                        PathInput(what, False, declared.suffixes)
                    ),
                )
                button.grid(row=0, column=column, padx=(6, 0))
                self.buttons.append(button)
        return widget

    def _menu(self, values: tuple[str, ...], command: Callable[[str], None]) -> Any:
        self.var = tkinter.StringVar(self.frame)
        widget = ctk.CTkOptionMenu(
            self.frame,
            values=list(values),
            variable=self.var,
            command=command,
            dynamic_resizing=False,
            width=200,
        )
        widget.grid(row=0, column=0, sticky="w")
        return widget

    # -- edits, both ways -----------------------------------------------------------------------

    def _edited(self, value: Any) -> None:
        if not self._writing:
            self.form.set(self.spec.key, value)

    def _ticked(self) -> None:
        self._edited(bool(self.var.get()))

    def _toggled(self) -> None:
        if not self._writing:
            self.form.tick(self.spec.key, bool(self.var.get()))

    def _text_modified(self, _event: Any = None) -> None:
        if self.widget.edit_modified():
            self.widget.edit_modified(False)
            self._edited(self.widget.get("1.0", "end-1c"))

    def _browse(self, what: PathInput) -> None:
        chosen = self._pick_path(what, str(self.form.get(self.spec.key)))
        if chosen:
            self.var.set(chosen)

    def refresh(self) -> None:
        """Show the form's value (edits the user is making are already there)."""
        value = self.form.get(self.spec.key)
        self._writing = True
        try:
            kind = self.spec.kind
            if kind is Kind.TOGGLE:
                ticked = self.form.ticked(self.spec.key)
                if bool(self.var.get()) != ticked:
                    self.var.set(ticked)
                if ticked:
                    self.method.set(value)
                    self.method.grid()
                else:
                    self.method.grid_remove()
            elif kind is Kind.LINES:
                if self.widget.get("1.0", "end-1c") != value:
                    self.widget.delete("1.0", "end")
                    self.widget.insert("1.0", value)
                    self.widget.edit_modified(False)
            elif self.var.get() != value:
                self.var.set(value)
        finally:
            self._writing = False

    # -- state ----------------------------------------------------------------------------------

    def set_visible(self, visible: bool) -> None:
        if visible == self.visible:
            return
        self.visible = visible
        for widget in (self.label, self.frame, self.error):
            if widget is not None:
                if visible:
                    widget.grid()
                else:
                    widget.grid_remove()

    def mark(self, messages: list[str]) -> None:
        """Show the CLI's messages for this field under its input (none: unmark)."""
        if messages == self.messages:
            return
        self.messages = messages
        if messages and self.error is None:
            self.error = ctk.CTkLabel(
                self.parent,
                text="",
                text_color=ERROR_COLOR,
                anchor="w",
                justify="left",
                wraplength=520,
            )
            self.error.grid(row=self.row + 1, column=1, sticky="w", padx=(0, 12))
        if self.error is not None:
            self.error.configure(text="\n".join(messages))
            if messages and self.visible:
                self.error.grid()
            else:
                self.error.grid_remove()
        text_color = ERROR_COLOR if messages else ctk.ThemeManager.theme["CTkLabel"]["text_color"]
        self.label.configure(text_color=text_color)
        if isinstance(self.widget, ctk.CTkEntry):
            default = ctk.ThemeManager.theme["CTkEntry"]["border_color"]
            self.widget.configure(border_color=ERROR_COLOR if messages else default)

    def destroy(self) -> None:
        for widget in (self.label, self.frame, self.error):
            if widget is not None:
                widget.destroy()
