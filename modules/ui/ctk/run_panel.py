"""The run side of the window: Start / Resume / Stop / Sample now / Backup now, the progress
bar and figures, a status area, the live loss plot and the latest samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import customtkinter as ctk
from PIL import Image

from modules.ui.ctk.inputs import Tooltip
from modules.ui.run_control import RunProgress

THUMBNAIL = 196  # pixels; small samples are scaled up to this


def _hex(widget: Any, color: Any) -> str:
    """A CustomTkinter colour (a Tk name, or a light/dark pair) as #rrggbb for matplotlib."""
    if isinstance(color, (list, tuple)):
        color = color[1] if ctk.get_appearance_mode() == "Dark" else color[0]
    red, green, blue = (value // 257 for value in widget.winfo_rgb(color))
    return f"#{red:02x}{green:02x}{blue:02x}"


class LossPlot:
    """Training loss (raw and smoothed) and validation loss against the step. A redraw costs
    the window about a tenth of a second (mostly tick labels), so it happens at most every
    `min_interval` seconds however fast steps arrive; the margins are fixed, as a tight layout
    would measure every label again on each draw."""

    def __init__(self, parent: Any, *, min_interval: float = 1.5) -> None:
        from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg
        from matplotlib.figure import Figure

        background = _hex(parent, ctk.ThemeManager.theme["CTkFrame"]["fg_color"])
        text = _hex(parent, ctk.ThemeManager.theme["CTkLabel"]["text_color"])
        self.figure = Figure(figsize=(4.4, 2.3), dpi=100, facecolor=background)
        self.figure.subplots_adjust(left=0.15, right=0.97, top=0.95, bottom=0.2)
        axes = self.axes = self.figure.add_subplot(facecolor=background)
        (self.raw,) = axes.plot([], [], linewidth=1, alpha=0.35, color="#3b8ed0", label="loss")
        (self.smoothed,) = axes.plot([], [], linewidth=2, color="#3b8ed0", label="smoothed")
        (self.validation,) = axes.plot(
            [], [], "o-", markersize=4, color="#e07b39", label="validation"
        )
        axes.set_xlabel("step", color=text)
        axes.set_ylabel("loss", color=text)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.tick_params(colors=text, labelsize=8)
        axes.grid(alpha=0.25)
        for spine in axes.spines.values():
            spine.set_color(text)
        self.canvas = FigureCanvasTkAgg(self.figure, master=parent)
        self.widget = self.canvas.get_tk_widget()
        self.widget.configure(background=background, highlightthickness=0)
        self.min_interval = min_interval
        self._shown = (0, 0)
        self._drawn_at = 0.0
        self.draws = 0

    def show(self, progress: RunProgress) -> None:
        counts = (len(progress.losses), len(progress.validation_losses))
        if counts == self._shown or time.monotonic() - self._drawn_at < self.min_interval:
            return
        self._shown, self._drawn_at = counts, time.monotonic()
        for line, points in (
            (self.raw, progress.losses),
            (self.smoothed, progress.smoothed_losses),
            (self.validation, progress.validation_losses),
        ):
            line.set_data([p[0] for p in points], [p[1] for p in points])
        if progress.validation_losses and not self.axes.get_legend():
            self.axes.legend(fontsize=7, loc="upper right")
        self.axes.set_autoscale_on(True)  # the empty plot's fixed 0..1 limits end here
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()
        self.draws += 1


class SamplesView:
    """The latest samples as thumbnails, two to a row."""

    def __init__(self, parent: Any) -> None:
        self.frame = ctk.CTkFrame(parent, fg_color="transparent")
        self.title = ctk.CTkLabel(self.frame, text="Samples: none yet", anchor="w")
        self.title.grid(row=0, column=0, columnspan=2, sticky="w")
        self.shown: tuple[Path, ...] = ()
        self._labels: list[ctk.CTkLabel] = []
        self._images: list[ctk.CTkImage] = []  # Tk forgets images nobody holds

    def show(self, paths: tuple[Path, ...], step: int | None) -> None:
        if paths == self.shown:
            return
        for label in self._labels:
            label.destroy()
        self._labels, self._images, self.shown = [], [], paths
        self.title.configure(text=f"Samples at step {step}" if paths else "Samples: none yet")
        for index, path in enumerate(paths):
            try:
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            except OSError as error:
                label = ctk.CTkLabel(self.frame, text=f"{path.name}: {error}")
            else:
                scale = THUMBNAIL / max(image.size)
                size = (round(image.width * scale), round(image.height * scale))
                picture = ctk.CTkImage(light_image=image, dark_image=image, size=size)
                self._images.append(picture)
                label = ctk.CTkLabel(self.frame, text="", image=picture)
                Tooltip(label, lambda path=path: str(path))
            label.grid(row=1 + index // 2, column=index % 2, padx=(0, 6), pady=(4, 0), sticky="w")
            self._labels.append(label)


class RunPanel(ctk.CTkFrame):
    def __init__(
        self,
        parent: Any,
        *,
        on_start: Callable[[], None],
        on_resume: Callable[[], None],
        on_stop: Callable[[], None],
        on_sample: Callable[[], None],
        on_backup: Callable[[], None],
    ) -> None:
        super().__init__(parent)
        self.grid_columnconfigure(0, weight=1)
        buttons = ctk.CTkFrame(self, fg_color="transparent")
        buttons.grid(row=0, column=0, sticky="ew", padx=10, pady=(10, 4))
        for column in range(3):
            buttons.grid_columnconfigure(column, weight=1)
        self.start_button = ctk.CTkButton(buttons, text="Start", command=on_start)
        self.resume_button = ctk.CTkButton(buttons, text="Resume", command=on_resume)
        self.stop_button = ctk.CTkButton(buttons, text="Stop", command=on_stop)
        self.sample_button = ctk.CTkButton(buttons, text="Sample now", command=on_sample)
        self.backup_button = ctk.CTkButton(buttons, text="Backup now", command=on_backup)
        for index, button in enumerate(
            (
                self.start_button,
                self.resume_button,
                self.stop_button,
                self.sample_button,
                self.backup_button,
            )
        ):
            button.grid(row=index // 3, column=index % 3, sticky="ew", padx=3, pady=3)
        Tooltip(self.start_button, lambda: "Train the config shown (refused while it is invalid).")
        Tooltip(self.resume_button, lambda: "Continue from the newest backup in the workspace.")
        Tooltip(
            self.stop_button,
            lambda: (
                "End after the current step and write a backup (backup.on_interrupt); "
                "before the first step, or pressed again, stop at once."
            ),
        )
        self.progress_bar = ctk.CTkProgressBar(self)
        self.progress_bar.grid(row=1, column=0, sticky="ew", padx=14, pady=(8, 2))
        self.progress_bar.set(0)
        self.summary = ctk.CTkLabel(self, text="not started", anchor="w")
        self.summary.grid(row=2, column=0, sticky="ew", padx=14)
        self.status = ctk.CTkTextbox(self, height=130, wrap="word", font=("", 12))
        self.status.grid(row=3, column=0, sticky="ew", padx=10, pady=(6, 6))
        self.status.configure(state="disabled")
        self.plot: LossPlot | None = None  # matplotlib loads after the window has opened
        self.plot_area = ctk.CTkFrame(self, height=230, fg_color="transparent")
        self.plot_area.grid(row=4, column=0, sticky="ew", padx=10)
        self.samples = SamplesView(self)
        self.samples.frame.grid(row=5, column=0, sticky="nsew", padx=12, pady=(6, 10))
        self.status_lines: list[str] = []

    def build_plot(self) -> LossPlot:
        if self.plot is None:
            self.plot = LossPlot(self.plot_area)
            self.plot.widget.pack(fill="x")
        return self.plot

    def show_run(self, progress: RunProgress, *, running: bool) -> None:
        """Called on every poll of the run; widgets are touched only when something changed
        (a CustomTkinter configure redraws the widget)."""
        training = running and progress.state in ("training", "stopping")
        for button, enabled in (
            (self.start_button, not running),
            (self.resume_button, not running),
            (self.stop_button, running),
            (self.sample_button, training),
            (self.backup_button, training),
        ):
            state = "normal" if enabled else "disabled"
            if button.cget("state") != state:
                button.configure(state=state)
        if abs(self.progress_bar.get() - progress.fraction) > 1e-9:
            self.progress_bar.set(progress.fraction)
        text = progress.summary() if progress.total_steps else progress.phase or "not started"
        if running and progress.phase and progress.phase != "training":
            text = f"{text} · {progress.phase}…" if progress.total_steps else f"{progress.phase}…"
        if self.summary.cget("text") != text:
            self.summary.configure(text=text)
        if progress.losses:
            self.build_plot().show(progress)
        self.samples.show(progress.samples, progress.samples_step)

    def show_status(self, lines: list[str]) -> None:
        if lines == self.status_lines:
            return
        self.status_lines = lines
        self.status.configure(state="normal")
        self.status.delete("1.0", "end")
        self.status.insert("1.0", "\n".join(lines))
        self.status.configure(state="disabled")
