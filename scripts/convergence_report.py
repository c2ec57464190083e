"""Tables, goal verdicts and plots of scripts/benchmark_convergence.py from its raw run curves.

Definitions (also printed above the tables):
- E1 reaches a target when |dW - dW*| / |dW*| falls to it: 1e-2 (the issue's), and 1e-3. At
  condition number 100 the target's smallest singular value is 0.9% of its norm, so 1e-2 is
  reached without learning that direction at all; 1e-3 needs it to about 10%. An arm's band is
  the run of adjacent grid learning rates around its best one whose median seed reaches it.
- E2's base loss L0 is the validation loss with the LoRA at its start (B = 0, the base model).
  A learning rate ends "within 10% of the best" when its median final loss keeps at least 90% of
  the arm's best improvement over L0 (final <= best + 0.1 (L0 - best)): the diffusion loss has a
  large floor that no LoRA removes, so 10% of the loss itself would admit learning rates that
  learned almost nothing. The target loss is L0 - 0.8 (L0 - L*), L* the lowest median final loss
  of any arm at that rank. A run diverged when its loss became non-finite or it ended above L0.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from modules.util.markdown_section import BENCHMARKS_MD, replace_section

E1_TARGETS = (1e-2, 1e-3)  # the runs stop at the last
FAMILY_TITLES = {"adamw": "AdamW-based", "sgd": "SGD (momentum 0.9)", "prodigy": "Prodigy"}


def _finite(values: list[float | None]) -> list[float]:
    return [math.inf if v is None else v for v in values]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "∞"
    return f"{value:.{digits}f}"


def _decades(lrs: list[float]) -> float:
    return math.log10(max(lrs) / min(lrs)) if lrs else 0.0


def _band(lrs: list[float], ok: dict[float, bool], best: float) -> list[float]:
    """Adjacent grid learning rates around `best` that are ok."""
    index = lrs.index(best)
    low = high = index
    while low > 0 and ok[lrs[low - 1]]:
        low -= 1
    while high < len(lrs) - 1 and ok[lrs[high + 1]]:
        high += 1
    return lrs[low : high + 1] if ok[best] else []


def _steps_to(result: dict[str, Any], target: float) -> float:
    for step, value in zip(result["steps_at"], _finite(result["values"]), strict=True):
        if value <= target:
            return step
    return math.inf


class ArmSummary:
    """One arm on one problem: per learning rate, its seeds' numbers."""

    def __init__(self, arm: str, family: str, runs: list[dict[str, Any]]) -> None:
        self.arm, self.family = arm, family
        self.by_lr: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for run in runs:
            self.by_lr[run["lr"]].append(run)
        self.lrs = sorted(self.by_lr)

    def finals(self, lr: float) -> list[float]:
        return [_finite(run["values"])[-1] for run in self.by_lr[lr]]

    def bests(self, lr: float) -> list[float]:
        return [min(_finite(run["values"])) for run in self.by_lr[lr]]

    def steps(self, lr: float, target: float) -> list[float]:
        return [_steps_to(run, target) for run in self.by_lr[lr]]

    def curve(self, lr: float) -> tuple[list[int], list[float]]:
        """Median over seeds at each measured step (runs stopped early hold their last value)."""
        runs = self.by_lr[lr]
        steps = sorted({s for run in runs for s in run["steps_at"]})
        medians = []
        for step in steps:
            at = []
            for run in runs:
                values = _finite(run["values"])
                known = [v for s, v in zip(run["steps_at"], values, strict=True) if s <= step]
                at.append(known[-1] if known else values[0])
            medians.append(_median(at))
        return steps, medians


def group_runs(results: list[dict[str, Any]], experiment: str, arms) -> dict[str, dict]:
    """problem label -> arm name -> ArmSummary"""
    grouped: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    labels: dict[str, dict[str, Any]] = {}
    for run in results:
        if run["experiment"] != experiment:
            continue
        label = _problem_label(run)
        labels[label] = run["problem"]
        grouped[label][run["arm"]].append(run)
    family = {arm.name: arm.family for arm in arms}
    return {
        label: {
            arm.name: ArmSummary(arm.name, family[arm.name], by_arm[arm.name])
            for arm in arms
            if arm.name in by_arm
        }
        for label, by_arm in grouped.items()
    }


# -- E1 ---------------------------------------------------------------------------------------------


def e1_summary(arm: ArmSummary, target: float) -> dict[str, Any]:
    medians = {lr: _median(arm.steps(lr, target)) for lr in arm.lrs}
    final = {lr: _median(arm.finals(lr)) for lr in arm.lrs}
    best = min(arm.lrs, key=lambda lr: (medians[lr], final[lr]))
    band = _band(arm.lrs, {lr: math.isfinite(medians[lr]) for lr in arm.lrs}, best)
    steps = arm.steps(best, target)
    return {
        "best_lr": best,
        "steps": medians[best],
        "range": (min(steps), max(steps)),
        "final": final[best],
        "band": _decades(band) if band else None,
        "reached": sum(math.isfinite(s) for lr in arm.lrs for s in arm.steps(lr, target)),
        "runs": sum(len(arm.by_lr[lr]) for lr in arm.lrs),
    }


def e1_tables(
    grouped: dict[str, dict[str, ArmSummary]], *, steps: int, target: float
) -> tuple[str, dict]:
    labels = list(grouped)
    arms = list(next(iter(grouped.values())))
    summaries = {
        (label, arm): e1_summary(grouped[label][arm], target) for label in labels for arm in arms
    }
    lines = [
        f"Steps to a relative error of {target:g} at each arm's best learning rate (median of the "
        f"seeds, min-max in brackets, ∞: not within {steps} steps), the learning rate, and in the "
        f"second table the band of grid learning rates whose median seed reaches {target:g}, in "
        "decades (— : none does).",
        "",
        "| arm | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for arm in arms:
        cells = []
        for label in labels:
            s = summaries[(label, arm)]
            low, high = s["range"]
            cells.append(
                f"{_fmt(s['steps'], 0)} ({_fmt(low, 0)}-{_fmt(high, 0)}) @ {s['best_lr']:g}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "| band (decades) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for arm in arms:
        cells = []
        for label in labels:
            band = summaries[(label, arm)]["band"]
            cells.append("—" if band is None else f"{band:.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summaries


# -- E2 ---------------------------------------------------------------------------------------------


def e2_summary(arm: ArmSummary, *, base: float, target: float) -> dict[str, Any]:
    final = {lr: _median(arm.finals(lr)) for lr in arm.lrs}
    best = min(arm.lrs, key=lambda lr: final[lr])
    kept = final[best] + 0.1 * (base - final[best])
    band = _band(arm.lrs, {lr: final[lr] <= kept for lr in arm.lrs}, best)
    finals, steps = arm.finals(best), arm.steps(best, target)
    diverged = sum(
        any(v is None for v in run["values"]) or _finite(run["values"])[-1] > base
        for lr in arm.lrs
        for run in arm.by_lr[lr]
    )
    return {
        "best_lr": best,
        "final": final[best],
        "final_range": (min(finals), max(finals)),
        "best": _median(arm.bests(best)),
        "steps": _median(steps),
        "steps_range": (min(steps), max(steps)),
        "band": _decades(band) if band else None,
        "diverged": diverged,
        "runs": sum(len(arm.by_lr[lr]) for lr in arm.lrs),
        "final_by_lr": final,
        "base": base,
    }


def e2_levels(arms: dict[str, ArmSummary]) -> tuple[float, float, float]:
    """(L0, L*, target) of one rank."""
    first = next(iter(arms.values()))
    base = _finite(first.by_lr[first.lrs[0]][0]["values"])[0]
    lowest = min(_median(arm.finals(lr)) for arm in arms.values() for lr in arm.lrs)
    return base, lowest, base - 0.8 * (base - lowest)


def e2_tables(grouped: dict[str, dict[str, ArmSummary]]) -> tuple[str, dict]:
    lines, summaries = [], {}
    for label, arms in grouped.items():
        base, lowest, target = e2_levels(arms)
        lines += [
            f"**{label}**: base loss L0 = {base:.4f} (the LoRA at its start), lowest median final "
            f"loss L* = {lowest:.4f}, target = {target:.4f}.",
            "",
            "| arm | best lr | final val. loss | best val. loss | steps to target | band "
            "(decades) | diverged |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, arm in arms.items():
            s = e2_summary(arm, base=base, target=target)
            summaries[(label, name)] = s
            low, high = s["final_range"]
            slow, shigh = s["steps_range"]
            band = "—" if s["band"] is None else f"{s['band']:.1f}"
            lines.append(
                f"| {name} | {s['best_lr']:g} | {_fmt(s['final'])} ({_fmt(low)}-{_fmt(high)}) | "
                f"{_fmt(s['best'])} | {_fmt(s['steps'], 0)} ({_fmt(slow, 0)}-{_fmt(shigh, 0)}) | "
                f"{band} | {s['diverged']}/{s['runs']} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip(), summaries


# -- goals ------------------------------------------------------------------------------------------


def goal_lines(e1: dict, e2: dict) -> list[str]:
    """The issue's four goals, each with its numbers and a verdict."""
    out = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for label in sorted({label for label, _ in e2}):
        plain, riem = e2[(label, "AdamW")], e2[(label, "AdamW + Riemannian")]
        ok = riem["steps"] <= 0.5 * plain["steps"]
        out.append(
            f"E2 {label}: AdamW + Riemannian reaches the target in {_fmt(riem['steps'], 0)} "
            f"steps against AdamW's {_fmt(plain['steps'], 0)} (goal: at most half): {verdict(ok)}."
        )
        band_r, band_p = riem["band"] or 0.0, plain["band"] or 0.0
        out.append(
            f"E2 {label}: band {band_r:.1f} decades against AdamW's {band_p:.1f} (goal: at least "
            f"one decade wider): {verdict(band_r >= band_p + 1.0 - 1e-9)}."
        )
        sgd = e2[(label, "SGD + Riemannian")]
        limit = plain["final"] + 0.1 * (plain["base"] - plain["final"])
        out.append(
            f"E2 {label}: SGD + Riemannian ends at {_fmt(sgd['final'])} against AdamW's best "
            f"{_fmt(plain['final'])} (goal: within 10% of AdamW's improvement, <= {_fmt(limit)}): "
            f"{verdict(sgd['final'] <= limit)}."
        )
        ada = e2[(label, "AdamW + AdaPreLoRA")]
        out.append(
            f"E2 {label}: AdaPreLoRA ends at {_fmt(ada['final'])} against Riemannian's "
            f"{_fmt(riem['final'])} (goal: at least as good): {verdict(ada['final'] <= riem['final'])}."
        )
    for target, summaries in e1.items():
        for label in sorted({label for label, _ in summaries}):
            plain = summaries[(label, "AdamW")]
            riem = summaries[(label, "AdamW + Riemannian")]
            ok = riem["steps"] <= 0.5 * plain["steps"]
            out.append(
                f"E1 {label}: AdamW + Riemannian reaches {target:g} in {_fmt(riem['steps'], 0)} "
                f"steps against AdamW's {_fmt(plain['steps'], 0)}: {verdict(ok)}; bands "
                f"{riem['band'] or 0:.1f} against {plain['band'] or 0:.1f} decades: "
                f"{verdict((riem['band'] or 0) >= (plain['band'] or 0) + 1 - 1e-9)}."
            )
    return out


# -- the report -------------------------------------------------------------------------------------


def _problem_label(run: dict[str, Any]) -> str:
    problem = run["problem"]
    if run["experiment"] == "E1":
        return f"kappa {problem['condition']:g}, r {problem['rank']}"
    return f"rank {problem['rank']}"


def finished_runs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of the (problem, seed) blocks that every arm and learning rate finished (all of
    them for a complete run)."""
    results = record["results"]
    if len(results) >= record.get("jobs", len(results)):
        return results
    blocks: dict[tuple[str, int], list] = defaultdict(list)
    for run in results:
        blocks[(_problem_label(run), run["seed"])].append(run)
    size = max(len(block) for block in blocks.values())
    return [run for block in blocks.values() if len(block) == size for run in block]


def run_line(record: dict[str, Any]) -> str:
    results = record["results"]
    cpu = sum(r.get("cpu_seconds", 0.0) for r in results) / 60
    line = (
        f"{record['header']} Run time {record['minutes']:.1f} min; the runs themselves took "
        f"{cpu:.1f} CPU-minutes (one thread each), which the machine's other load inflates "
        "much less than the run time."
    )
    planned = record.get("jobs", len(results))
    if len(results) < planned:
        kept = defaultdict(set)
        for run in finished_runs(record):
            kept[_problem_label(run)].add(run["seed"])
        seeds = "; ".join(f"{label}: {len(s)} seed(s)" for label, s in kept.items())
        line += (
            f" **Stopped early, after {len(results)} of {planned} runs: the tables use the seeds "
            f"that every arm and learning rate finished ({seeds or 'none'}).**"
        )
    return line


def write_report(
    records: dict[str, dict[str, Any]], *, images: Path, doc: Path, write: bool, quick: bool
) -> str:
    """The section from each experiment's last recorded run (`header`, `minutes`, `plan`,
    `results`); the goals need both experiments."""
    from scripts import convergence_plots as plots
    from scripts.benchmark_convergence import ARMS

    parts = [
        "## Convergence: does the preconditioner help? (`scripts/benchmark_convergence.py`)",
        "",
        *__doc__.split("\n\n", 1)[1].strip().splitlines(),
        "",
    ]
    e1 = e2 = {}
    if "E1" in records:
        record, plan = records["E1"], records["E1"]["plan"]
        grouped = group_runs(finished_runs(record), "E1", ARMS)
        parts += [
            f"### E1: LoRA on a frozen 64 x 64 linear layer, rank-4 target ({plan['seeds']} "
            f"seeds, full batch, no weight decay, no clipping, up to {plan['steps']} steps)",
            "",
            run_line(record),
            "",
        ]
        e1 = {}
        for target in E1_TARGETS:
            table, e1[target] = e1_tables(grouped, steps=plan["steps"], target=target)
            parts += [table, ""]
            if write:
                image = plots.plot_e1(grouped, images, steps=plan["steps"], target=target).name
                parts += [f"![E1: steps to {target:g} by learning rate](images/{image})", ""]
    if "E2" in records:
        record, plan = records["E2"], records["E2"]["plan"]
        grouped = group_runs(finished_runs(record), "E2", ARMS)
        table, e2 = e2_tables(grouped)
        parts += [
            f"### E2: the tiny world's concept fine-tune ({plan['seeds']} seeds, {plan['steps']} "
            f"steps of batch 4, validation every {plan['every']} steps)",
            "",
            run_line(record),
            "",
            table,
            "",
        ]
        if write:
            plots.plot_e2(grouped, images)
            parts += [
                "![E2: final validation loss by learning rate](images/convergence_e2_lr.png)",
                "",
                "![E2: validation loss by step](images/convergence_e2_steps.png)",
                "",
            ]
    if e1 and e2 and not quick:
        parts += ["### Goals", "", *[f"- {line}" for line in goal_lines(e1, e2)], ""]
    text = "\n".join(parts).rstrip()
    if write:
        replace_section(doc, "convergence", text)
    return text


__all__ = ["BENCHMARKS_MD", "write_report"]
