"""The loss curve of a run as a PNG, drawn from its TensorBoard logs.

Read from the event files rather than kept in memory, so a resumed run's curve starts at step 1:
every event file in the logs folder is read in the order it was written, and a step logged again
after a resume (the steps between the last backup and the interruption) keeps its newest value.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modules.util.atomic import atomic_path

CURVES = {  # tag -> legend label
    "loss/train": "training loss",
    "loss/train_smoothed": "training loss (smoothed)",
    "loss/validation": "validation loss",
}


def read_scalars(logs: Path, tags: list[str]) -> dict[str, dict[int, float]]:
    """step -> value for each of `tags` found in the event files under `logs`."""
    found: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    files = sorted(logs.glob("events.out.tfevents.*"), key=lambda f: (f.stat().st_mtime, f.name))
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                found[tag].update({event.step: event.value for event in accumulator.Scalars(tag)})
    return found


def write_loss_curve(logs: Path, path: Path, *, title: str) -> Path | None:
    """Training (raw and smoothed) and validation loss by step; None when nothing was logged."""
    curves = read_scalars(logs, list(CURVES))
    if not any(curves.values()):
        return None
    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.subplots()
    styles = {
        "loss/train": {"color": "tab:blue", "alpha": 0.3, "linewidth": 1},
        "loss/train_smoothed": {"color": "tab:blue", "linewidth": 2},
        "loss/validation": {"color": "tab:orange", "linewidth": 2, "marker": "o"},
    }
    for tag, points in curves.items():
        if points:
            steps = sorted(points)
            axes.plot(steps, [points[s] for s in steps], label=CURVES[tag], **styles[tag])
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return path
