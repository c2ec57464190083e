"""A tab of the window: the form's fields for that tab, under their section headings, and the
item-by-item editors of lists (concepts). Everything shown is generated from the form's specs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import customtkinter as ctk

from modules.config.fields import PathInput
from modules.ui.ctk.inputs import ERROR_COLOR, MUTED_COLOR, FieldInput, Tooltip
from modules.ui.fields import ListSpec, Spec
from modules.ui.form import ConfigForm

PathPicker = Callable[[PathInput, str], str | None]
# the view's own rows on a tab (the data report, the presets): (frame, first row) -> next row
ExtraRows = Callable[[Any, int], int]
HEADING_FONT = ("", 15, "bold")


class ListEditor:
    """A list of sections (concepts): one button per item, Add / Remove, and the selected
    item's fields below."""

    def __init__(
        self, parent: Any, *, row: int, spec: ListSpec, form: ConfigForm, pick_path: PathPicker
    ) -> None:
        self.spec, self.form, self.pick_path = spec, form, pick_path
        self.selected = 0
        self.inputs: list[FieldInput] = []
        self.frame = ctk.CTkFrame(parent)
        self.frame.grid(row=row, column=0, columnspan=2, sticky="ew", padx=12, pady=(6, 6))
        self.frame.grid_columnconfigure(0, weight=1)
        header = ctk.CTkFrame(self.frame, fg_color="transparent")
        header.grid(row=0, column=0, sticky="ew", padx=8, pady=(8, 2))
        title = ctk.CTkLabel(header, text=spec.label, font=("", 13, "bold"))
        title.pack(side="left")
        Tooltip(title, lambda: f"{spec.help}\n\nConfig key: {spec.key}")
        self.remove_button = ctk.CTkButton(header, text="Remove", width=80, command=self.remove)
        self.remove_button.pack(side="right", padx=(6, 0))
        self.add_button = ctk.CTkButton(header, text="Add", width=80, command=self.add)
        self.add_button.pack(side="right")
        self.items = ctk.CTkFrame(self.frame, fg_color="transparent")
        self.items.grid(row=1, column=0, sticky="ew", padx=8)
        self.items.grid_columnconfigure(0, weight=1)
        self.detail = ctk.CTkFrame(self.frame, fg_color="transparent")
        self.detail.grid(row=2, column=0, sticky="ew", pady=(4, 8))
        self.detail.grid_columnconfigure(1, weight=1)
        self.item_buttons: list[ctk.CTkButton] = []
        self.empty = ctk.CTkLabel(
            self.items, text="none yet: press Add", text_color=MUTED_COLOR, anchor="w"
        )
        self.empty.grid(row=0, column=0, sticky="w")
        self.rebuild()

    def add(self) -> None:
        self.selected = self.form.add_item(self.spec.key)  # the form's change rebuilds this

    def remove(self) -> None:
        if self.form.count(self.spec.key):
            self.form.remove_item(self.spec.key, self.selected)

    def select(self, index: int) -> None:
        self.selected = index
        self._build_detail()
        self.update_titles()

    def rebuild(self) -> None:
        """Item buttons and the selected item's inputs, after the list itself changed. Buttons
        are kept and reused: one may be running its own click handler right now."""
        count = self.form.count(self.spec.key)
        self.selected = min(self.selected, max(count - 1, 0))
        while len(self.item_buttons) < count:
            index = len(self.item_buttons)
            button = ctk.CTkButton(
                self.items, anchor="w", command=lambda index=index: self.select(index)
            )
            button.grid(row=index + 1, column=0, sticky="ew", pady=1)
            self.item_buttons.append(button)
        while len(self.item_buttons) > count:
            self.item_buttons.pop().destroy()
        if count:
            self.empty.grid_remove()
        else:
            self.empty.grid()
        self.remove_button.configure(state="normal" if count else "disabled")
        self._build_detail()
        self.update_titles()

    def _build_detail(self) -> None:
        for field in self.inputs:
            field.destroy()
        self.inputs = []
        if self.form.count(self.spec.key):
            for row, spec in enumerate(self.spec.item_fields(self.selected)):
                field = FieldInput(
                    self.detail, row=2 * row, spec=spec, form=self.form, pick_path=self.pick_path
                )
                self.inputs.append(field)

    def update_titles(self) -> None:
        """Item buttons name each item by its first field (the folder) and mark invalid ones."""
        for index in range(len(self.item_buttons)):
            first = self.spec.item_fields(index)[0]
            shown = str(self.form.get(first.key)) or f"(no {first.label.lower()})"
            button = self.item_buttons[index]
            invalid = self.form.item_has_issue(self.spec.key, index)
            selected = index == self.selected
            button.configure(
                text=f"{index + 1}.  {shown}",
                fg_color=ctk.ThemeManager.theme["CTkButton"]["fg_color"]
                if selected
                else ("gray80", "gray25"),
                text_color=ERROR_COLOR if invalid and not selected else ("gray10", "gray95"),
                border_width=2 if invalid else 0,
                border_color=ERROR_COLOR,
            )


class FormTab:
    """The scrollable contents of one tab, rebuilt only when its set of fields changes."""

    def __init__(
        self,
        parent: Any,
        *,
        tab: str,
        form: ConfigForm,
        pick_path: PathPicker,
        header: ExtraRows | None = None,
        footer: ExtraRows | None = None,
    ) -> None:
        self.tab, self.form, self.pick_path = tab, form, pick_path
        self.header, self.footer = header, footer
        self.frame = ctk.CTkScrollableFrame(parent, fg_color="transparent")
        self.frame.pack(fill="both", expand=True)
        self.frame.grid_columnconfigure(1, weight=1)
        self.inputs: dict[str, FieldInput] = {}
        self.lists: list[ListEditor] = []
        self.headings: list[tuple[ctk.CTkLabel, list[str]]] = []
        self._signature: tuple[Spec, ...] = ()
        self.build()

    def signature(self) -> tuple[Spec, ...]:
        """What the tab shows: its specs (a family switch changes keys, or only choices)."""
        return tuple(self.form.tab_specs(self.tab))

    def build(self) -> None:
        for child in self.frame.winfo_children():
            child.destroy()
        self.inputs, self.lists, self.headings = {}, [], []
        self._signature = self.signature()
        row = self.header(self.frame, 0) if self.header is not None else 0
        for group, specs in _grouped(self.form.tab_specs(self.tab)):
            heading = ctk.CTkLabel(self.frame, text=group, font=HEADING_FONT, anchor="w")
            heading.grid(row=row, column=0, columnspan=2, sticky="w", padx=12, pady=(14, 2))
            self.headings.append((heading, [s.key for s in specs]))
            row += 1
            for spec in specs:
                if isinstance(spec, ListSpec):
                    self.lists.append(
                        ListEditor(
                            self.frame, row=row, spec=spec, form=self.form, pick_path=self.pick_path
                        )
                    )
                else:
                    self.inputs[spec.key] = FieldInput(
                        self.frame, row=row, spec=spec, form=self.form, pick_path=self.pick_path
                    )
                row += 2
        if self.footer is not None:
            self.footer(self.frame, row)

    def refresh(self, keys: frozenset[str] | None, structure: bool) -> None:
        """Follow a form change: rebuild when this tab's fields changed, else show new values."""
        if structure and self.signature() != self._signature:
            self.build()
            return
        if structure:
            for editor in self.lists:
                editor.rebuild()
        for field in self.all_inputs():
            if keys is None or field.spec.key in keys:
                field.refresh()

    def all_inputs(self) -> list[FieldInput]:
        return [*self.inputs.values(), *(i for editor in self.lists for i in editor.inputs)]

    def update_state(self, *, show_advanced: bool, issues: dict[str, list[str]]) -> None:
        """Hide fields that do not apply (or are advanced, unless shown), mark invalid ones."""
        for field in self.all_inputs():
            spec = field.spec
            field.set_visible((show_advanced or not spec.advanced) and self.form.applies(spec.key))
            field.mark(issues.get(spec.key, []))
        for editor in self.lists:
            editor.update_titles()
        for heading, keys in self.headings:
            shown = any(k not in self.inputs or self.inputs[k].visible for k in keys)
            if shown:
                heading.grid()
            else:
                heading.grid_remove()


def _grouped(specs: list[Spec]) -> list[tuple[str, list[Spec]]]:
    groups: dict[str, list[Spec]] = {}
    for spec in specs:
        groups.setdefault(spec.group, []).append(spec)
    return list(groups.items())
