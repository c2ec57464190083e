"""The trainer window (customtkinter): a thin view over TrainerApp.

Top bar (presets, Save preset, Load / Export config, advanced fields), the config tabs generated
from the schema, and the run panel. Buttons call TrainerApp; run events are polled with `after`
on the Tk thread, so no widget is ever touched from another thread.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import customtkinter as ctk

from modules.config.fields import PathInput
from modules.errors import UserError
from modules.ui.ctk.dialogs import MessageDialog, Questions
from modules.ui.ctk.form_view import HEADING_FONT, FormTab
from modules.ui.ctk.inputs import MUTED_COLOR
from modules.ui.ctk.run_panel import RunPanel
from modules.ui.form import FormChange, Issue
from modules.ui.trainer_app import TABS, TrainerApp
from modules.ui.worker import Failed

PRESET_PLACEHOLDER = "choose a preset…"


class TrainWindow(ctk.CTk):
    def __init__(self, app: TrainerApp, *, poll_ms: int = 100) -> None:
        super().__init__()
        self.app = app
        self.questions = Questions()
        self.messages: list[MessageDialog] = []
        self.poll_ms = poll_ms
        self._closing = False
        self._destroyed = False
        self._rebuild_pending = False
        self.title("Geodesic · LoRA trainer")
        self.geometry("1400x900")
        self.minsize(1100, 680)
        self.grid_columnconfigure(0, weight=1)
        self.grid_rowconfigure(1, weight=1)
        self._build_top_bar()
        self.tabview = ctk.CTkTabview(self)
        self.tabview.grid(row=1, column=0, sticky="nsew", padx=(10, 5), pady=(0, 10))
        # a field declaring a tab of its own gets that tab, after the known ones
        self.titles = {**TABS, **{t: t.capitalize() for t in app.form.tabs() if t not in TABS}}
        self._tab_keys = {title: tab for tab, title in self.titles.items()}
        for title in self.titles.values():
            self.tabview.add(title)
        self.tabview.configure(command=lambda: self.show_tab(self._tab_keys[self.tabview.get()]))
        # tabs are built when first shown or, one by one, while the window is idle: the window
        # opens after building only the first
        self.tabs: dict[str, FormTab] = {}
        self.panel = RunPanel(
            self,
            on_start=self.start,
            on_resume=lambda: self.start(resume=True),
            on_stop=self.stop,
            on_sample=app.run.sample_now,
            on_backup=app.run.backup_now,
        )
        self.panel.grid(row=1, column=1, sticky="nsew", padx=(5, 10), pady=(6, 10))
        self._build(next(iter(self.titles)))
        app.form.subscribe(self._form_changed)
        self.update_checks()
        self.protocol("WM_DELETE_WINDOW", self.close)
        self._poll_job = self.after(poll_ms, self._poll)
        # the rest is built once the window has shown and drawn itself (events come first)
        self._idle_job: str | None = None
        self.after_idle(self._schedule_background)
        self._checked_disk_at = time.monotonic()

    def _schedule_background(self) -> None:
        self._idle_job = self.after(200, self._build_in_background)

    def _build(self, tab: str) -> FormTab:
        if tab not in self.tabs:
            self.tabs[tab] = FormTab(
                self.tabview.tab(self.titles[tab]),
                tab=tab,
                form=self.app.form,
                pick_path=self._pick_path,
                header={"data": self._scan_section}.get(tab),
                footer={"general": self._presets_section}.get(tab),
            )
            self.update_checks()
        return self.tabs[tab]

    def show_tab(self, tab: str) -> FormTab:
        """Switch to `tab` (building it first if needed)."""
        built = self._build(tab)
        if self.tabview.get() != self.titles[tab]:
            self.tabview.set(self.titles[tab])
        return built

    def _build_in_background(self) -> None:
        """Build the loss plot, then one unbuilt tab per call, letting events in between."""
        if self.panel.plot is None:
            self.panel.build_plot()
        else:
            missing = [tab for tab in self.titles if tab not in self.tabs]
            if not missing:
                self.app.warm_up()  # and now the first Start need not wait for torch
                return
            self._build(missing[0])
        self._idle_job = self.after(20, self._build_in_background)

    def build_all(self) -> None:
        """Everything the background builds, now (tests, screenshots)."""
        self.panel.build_plot()
        for tab in self.titles:
            self._build(tab)

    # -- layout ---------------------------------------------------------------------------------

    def _build_top_bar(self) -> None:
        bar = ctk.CTkFrame(self, corner_radius=0)
        bar.grid(row=0, column=0, columnspan=2, sticky="ew", pady=(0, 6))
        ctk.CTkLabel(bar, text="Preset").pack(side="left", padx=(14, 6), pady=8)
        self.preset_menu = ctk.CTkOptionMenu(
            bar,
            values=self._preset_titles(),
            command=self.choose_preset,
            dynamic_resizing=False,
            width=280,
        )
        self.preset_menu.set(PRESET_PLACEHOLDER)
        self.preset_menu.pack(side="left", pady=8)
        self.save_preset_button = ctk.CTkButton(
            bar, text="Save preset…", width=110, command=self.save_preset
        )
        self.load_button = ctk.CTkButton(
            bar, text="Load config…", width=110, command=self.load_config
        )
        self.export_button = ctk.CTkButton(
            bar, text="Export config…", width=120, command=self.export_config
        )
        for button in (self.save_preset_button, self.load_button, self.export_button):
            button.pack(side="left", padx=(8, 0), pady=8)
        self.advanced = ctk.CTkSwitch(bar, text="Show advanced options", command=self.update_checks)
        self.advanced.pack(side="right", padx=14)

    def _presets_section(self, frame: Any, row: int) -> int:
        ctk.CTkLabel(frame, text="Presets", font=HEADING_FONT, anchor="w").grid(
            row=row, column=0, columnspan=2, sticky="w", padx=12, pady=(14, 2)
        )
        folder = self.app.presets.user_dir
        with contextlib.suppress(ValueError):  # shown as ~/... when under the home folder
            folder = "~" / folder.relative_to(Path.home())
        where = f"Your presets (Save preset…) are kept in {folder}"
        ctk.CTkLabel(frame, text=where, text_color=MUTED_COLOR, anchor="w").grid(
            row=row + 1, column=0, columnspan=2, sticky="w", padx=12
        )
        self.delete_preset_button = ctk.CTkButton(
            frame, text="Delete this preset", width=150, command=self.delete_preset
        )
        self.delete_preset_button.grid(row=row + 2, column=0, sticky="w", padx=12, pady=6)
        return row + 3

    def _scan_section(self, frame: Any, row: int) -> int:
        ctk.CTkLabel(frame, text="Data report", font=HEADING_FONT, anchor="w").grid(
            row=row, column=0, sticky="w", padx=12, pady=(14, 2)
        )
        self.scan_button = ctk.CTkButton(frame, text="Scan dataset", width=130, command=self.scan)
        self.scan_button.grid(row=row, column=1, sticky="e", padx=12, pady=(14, 2))
        self.scan_report = ctk.CTkTextbox(frame, height=120, wrap="none", font=("", 12))
        self.scan_report.grid(row=row + 1, column=0, columnspan=2, sticky="ew", padx=12, pady=4)
        self._show_report(["Scan dataset lists the usable images, skipped files and buckets."])
        return row + 2

    # -- the form -------------------------------------------------------------------------------

    def _form_changed(self, change: FormChange) -> None:
        if change.structure:
            # later, so the widget whose callback caused this is not destroyed inside it
            if not self._rebuild_pending:
                self._rebuild_pending = True
                self.after_idle(self._rebuild)
            return
        for tab in self.tabs.values():
            tab.refresh(change.keys, structure=False)
        self.update_checks()

    def _rebuild(self) -> None:
        self._rebuild_pending = False
        for tab in self.tabs.values():
            tab.refresh(None, structure=True)
        self.update_checks()

    def update_checks(self) -> None:
        """Visibility (applies / advanced), the CLI's messages on invalid inputs, the status."""
        if self._rebuild_pending:
            return  # the rebuild checks again, with inputs that match the form
        issues = self.app.form.issues_by_key()
        show_advanced = bool(self.advanced.get())
        for tab in self.tabs.values():
            tab.update_state(show_advanced=show_advanced, issues=issues)
        if "general" in self.tabs:
            preset = self.app.preset
            state = "normal" if preset is not None and not preset.builtin else "disabled"
            if self.delete_preset_button.cget("state") != state:
                self.delete_preset_button.configure(state=state)
        self._update_status()

    def _pick_path(self, what: PathInput, current: str) -> str | None:
        return self.questions.path(self, what, current)

    # -- top bar actions ------------------------------------------------------------------------

    def _preset_titles(self) -> list[str]:
        return [preset.title for preset in self.app.presets.presets()] or ["(no presets)"]

    def choose_preset(self, title: str) -> None:
        try:
            self.app.load_preset(title)
        except UserError as error:
            self.show_message("Cannot load the preset", str(error))
        self.update_checks()

    def save_preset(self) -> None:
        current = self.app.preset.name if self.app.preset and not self.app.preset.builtin else ""
        name = self.questions.text(
            self,
            title="Save preset",
            prompt=f"Name of your preset{f' ({current})' if current else ''}:",
        )
        if not name:
            return
        try:
            preset = self.app.save_preset(name)
        except UserError as error:
            self.show_message("Cannot save the preset", str(error))
            return
        self.preset_menu.configure(values=self._preset_titles())
        self.preset_menu.set(preset.title)
        self.update_checks()

    def delete_preset(self) -> None:
        preset = self.app.preset
        if preset is None or preset.builtin:
            return
        self.app.delete_preset(preset.title)
        self.preset_menu.configure(values=self._preset_titles())
        self.preset_menu.set(PRESET_PLACEHOLDER)
        self.update_checks()

    def load_config(self) -> None:
        path = self.questions.open_config(self)
        if not path:
            return
        try:
            self.app.load_file(path)
        except UserError as error:
            self.show_message("Cannot load the config", str(error))
            return
        self.preset_menu.set(PRESET_PLACEHOLDER)

    def export_config(self) -> None:
        path = self.questions.save_config(self)
        if not path:
            return
        try:
            self.app.export(path)
        except UserError as error:
            self.show_message("Cannot export an invalid config", str(error))

    # -- running --------------------------------------------------------------------------------

    def start(self, *, resume: bool = False) -> None:
        problems = self.app.start(resume=resume)
        if problems:
            self.show_problems(problems)
        self._refresh_run()

    def stop(self) -> None:
        self.app.run.stop()
        self._refresh_run()

    def scan(self) -> None:
        self._build("data")
        problems = self.app.scan_data()
        if problems:
            self._show_report(["Fix these first:", *(p.message for p in problems)])
        else:
            self._show_report(["scanning…"])

    def show_problems(self, problems: list[Issue]) -> None:
        lines = [f"[{self.titles.get(p.tab or '', 'General')}] {p.message}" for p in problems]
        self.show_message(
            "Cannot start",
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''} to fix first:\n\n"
            + "\n".join(lines),
        )

    def _poll(self) -> None:
        if self._destroyed:
            return
        try:
            scanning = self.app.scan.running
            events = self.app.poll()
            if scanning and not self.app.scan.running and "data" in self.tabs:
                if self.app.scan.error:
                    self._show_report([f"error: {self.app.scan.error}"])
                else:
                    self._show_report(self.app.scan.lines)
            for event in events:
                if isinstance(event, Failed):
                    self.show_message("The run stopped with an error", event.message)
            estimated = self.app.poll_estimate()
            self._refresh_run(changed=bool(events) or estimated)
            self._recheck_disk()
            if self._closing and not self.app.run.running:
                self.destroy()
                return
        finally:
            if not self._destroyed:
                self._poll_job = self.after(self.poll_ms, self._poll)

    def _recheck_disk(self, every: float = 2.0) -> None:
        """Folders may be made or moved while the window is open: look again now and then."""
        if time.monotonic() - self._checked_disk_at < every:
            return
        self._checked_disk_at = time.monotonic()
        before = self.app.form.issues()
        if self.app.problems() != before:
            self.update_checks()

    def _refresh_run(self, *, changed: bool = True) -> None:
        self.panel.show_run(self.app.run.progress, running=self.app.run.running)
        if changed:
            self._update_status()

    def _update_status(self) -> None:
        self.panel.show_status(self.app.status_lines())

    def _show_report(self, lines: list[str]) -> None:
        self.scan_report.configure(state="normal")
        self.scan_report.delete("1.0", "end")
        self.scan_report.insert("1.0", "\n".join(lines))
        self.scan_report.configure(state="disabled")

    # -- messages, errors, closing --------------------------------------------------------------

    def show_message(
        self, title: str, message: str, buttons: dict[str, Callable[[], None] | None] | None = None
    ) -> MessageDialog:
        dialog = MessageDialog(
            self, title=title, message=message, buttons=buttons, on_close=self.messages.remove
        )
        self.messages.append(dialog)
        return dialog

    def report_callback_exception(self, exc: type, value: BaseException, tb: Any) -> None:
        """A bug in a callback: print it and say so, and keep the window going."""
        traceback.print_exception(exc, value, tb)
        self.show_message("Internal error", f"{exc.__name__}: {value}\n(details on the console)")

    def close(self) -> None:
        """Close; a running run is first stopped at its next step (with its backup)."""
        if not self.app.run.running:
            self.destroy()
            return

        def stop_and_close() -> None:
            self._closing = True
            self.stop()

        self.show_message(
            "A run is in progress",
            "Stop it (a backup is written at the next step) and close the window?",
            buttons={"Stop and close": stop_and_close, "Keep running": None},
        )

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        for job in (self._poll_job, self._idle_job):
            with contextlib.suppress(AttributeError, ValueError):
                self.after_cancel(job)
        super().destroy()
