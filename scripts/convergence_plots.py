"""The plots of scripts/benchmark_convergence.py (PNG files for docs/images/), from the summaries
of scripts/convergence_report.py."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from scripts.convergence_report import FAMILY_TITLES, ArmSummary, _median, e2_levels


def plot_e2(grouped: dict[str, dict[str, ArmSummary]], images: Path) -> list[Path]:
    """The robustness plot (final loss by learning rate) and the loss by step at each arm's best."""
    images.mkdir(parents=True, exist_ok=True)
    families = list(FAMILY_TITLES)
    labels = list(grouped)
    robust = Figure(figsize=(12, 3.6 * len(labels)), dpi=90, layout="constrained")
    axes = robust.subplots(len(labels), len(families), squeeze=False)
    for row, label in enumerate(labels):
        base, lowest, _ = e2_levels(grouped[label])
        for column, family in enumerate(families):
            ax = axes[row][column]
            for name, arm in grouped[label].items():
                if arm.family != family:
                    continue
                medians = [_median(arm.finals(lr)) for lr in arm.lrs]
                low = [min(arm.finals(lr)) for lr in arm.lrs]
                high = [max(arm.finals(lr)) for lr in arm.lrs]
                cap = base + 0.6 * (base - lowest)
                clip = [min(v, cap) for v in medians]
                (line,) = ax.plot(arm.lrs, clip, marker="o", label=name)
                ax.fill_between(
                    arm.lrs,
                    [min(v, cap) for v in low],
                    [min(v, cap) for v in high],
                    color=line.get_color(),
                    alpha=0.15,
                )
            ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base model (L0)")
            ax.set_xscale("log")
            ax.set_ylim(lowest - 0.1 * (base - lowest), base + 0.65 * (base - lowest))
            ax.set_title(f"{FAMILY_TITLES[family]}, LoRA {label}")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("final validation loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    robust_path = images / "convergence_e2_lr.png"
    robust.savefig(robust_path)
    curves = Figure(figsize=(6 * len(labels), 4), dpi=90, layout="constrained")
    axes = curves.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels, strict=True):
        base, lowest, target = e2_levels(grouped[label])
        for name, arm in grouped[label].items():
            finals = {lr: _median(arm.finals(lr)) for lr in arm.lrs}
            best = min(arm.lrs, key=finals.get)
            steps, medians = arm.curve(best)
            ax.plot(steps, [min(v, base * 1.2) for v in medians], label=f"{name} @ {best:g}")
        ax.axhline(target, color="gray", linestyle=":", linewidth=1, label="target")
        ax.set_title(f"validation loss at each arm's best learning rate, LoRA {label}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss (median of seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    curves_path = images / "convergence_e2_steps.png"
    curves.savefig(curves_path)
    return [robust_path, curves_path]


def plot_e1(
    grouped: dict[str, dict[str, ArmSummary]], images: Path, *, steps: int, target: float
) -> Path:
    """Steps to `target` by learning rate: a row per condition number, a column per optimizer."""
    images.mkdir(parents=True, exist_ok=True)
    conditions = sorted({label.split(",")[0] for label in grouped}, key=lambda c: float(c[6:]))
    families = list(FAMILY_TITLES)
    figure = Figure(figsize=(12, 3.3 * len(conditions)), dpi=90, layout="constrained")
    axes = figure.subplots(len(conditions), len(families), squeeze=False)
    for row, condition in enumerate(conditions):
        for column, family in enumerate(families):
            ax = axes[row][column]
            for label, arms in grouped.items():
                if not label.startswith(condition + ","):
                    continue
                style = "-" if label.endswith("r 4") else "--"
                for name, arm in arms.items():
                    if arm.family != family:
                        continue
                    medians = [min(_median(arm.steps(lr, target)), steps * 1.1) for lr in arm.lrs]
                    ax.plot(
                        arm.lrs, medians, style, marker="o", label=f"{name}, {label.split(', ')[1]}"
                    )
            ax.axhline(steps, color="gray", linewidth=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{FAMILY_TITLES[family]}, {condition}")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(f"steps to {target:g} (top line: not reached)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    path = images / e1_image(target)
    figure.savefig(path)
    return path


def e1_image(target: float) -> str:
    return f"convergence_e1_{target:g}.png"
