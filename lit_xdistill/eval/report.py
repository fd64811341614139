"""Read lm-eval results files, pick one score per task, and render Win-and-Tie tables and plots.

lm-eval writes results as ``{"results": {task: {"acc,none": 0.5, "acc_stderr,none": ..., ...}},
"group_subtasks": {...}, "higher_is_better": {task: {metric: bool}}, ...}``. One metric per task is
compared; it is chosen, in this order, by an explicit ``metrics`` mapping, by the suite file, or by
the first of :data:`PREFERRED_METRICS` the task reports. The direction of a metric comes from the suite
file, else from the results file's ``higher_is_better`` block, else from :data:`LOWER_IS_BETTER`.
Without a task list, the compared tasks are the top-level entries of ``results`` (subtasks of a group,
e.g. the 57 MMLU subjects, are left out; the group's aggregate is used).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_xdistill.eval.wintie import LOSSLESS_THRESHOLD, WinTieReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PREFERRED_METRICS: tuple[str, ...] = (
    "acc_norm",
    "acc",
    "exact_match",
    "pass@1",
    "f1",
    "mc2",
    "word_perplexity",
    "perplexity",
)
"""Metrics tried in order when neither the caller nor the suite names one for a task."""

LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "logits_per_byte", "ter"}
)
"""Metrics compared with ``S <= (1 + α) T`` when no other source states a direction."""

SUMMARY_ALPHAS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""α values shown in the Markdown ``C_α`` table (those on the grid)."""


@dataclass(frozen=True)
class TaskScore:
    """One task's chosen score from a results file.

    Args:
        task: Task (or group) name.
        metric: Metric name without the lm-eval filter suffix (e.g. ``acc_norm``).
        value: The score.
        higher_is_better: Direction of the metric.
    """

    task: str
    metric: str
    value: float
    higher_is_better: bool


def load_results(path: str | Path) -> dict[str, Any]:
    """Load an lm-eval results JSON file (the one ``lm_eval --output_path`` or ``evaluate`` writes).

    Args:
        path: Path of the JSON file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No results file at {path}: pass the JSON that lm-eval wrote.")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path} is not an lm-eval results file: it has no 'results' mapping.")
    return data


def top_level_tasks(results: Mapping[str, Any]) -> list[str]:
    """Tasks and groups of ``results`` that are not subtasks of a reported group.

    Args:
        results: A loaded lm-eval results dict.
    """
    subtasks = {t for children in results.get("group_subtasks", {}).values() for t in children}
    return [name for name in results["results"] if name not in subtasks]


def _metric_key(task: str, entry: Mapping[str, Any], metric: str) -> str:
    """The ``metric,filter`` key of ``entry`` for ``metric`` (which may carry its own filter)."""
    if "," in metric:
        if metric not in entry:
            raise KeyError(f"Task {task!r} has no metric {metric!r}; it has {_metric_names(entry)}.")
        return metric
    keys = sorted(k for k in entry if k.split(",")[0] == metric)
    if not keys:
        raise KeyError(f"Task {task!r} has no metric {metric!r}; it has {_metric_names(entry)}.")
    return f"{metric},none" if f"{metric},none" in keys else keys[0]


def _metric_names(entry: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(",")[0] for k in entry if "," in k and "_stderr" not in k})


def _to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for metrics it could not compute
        return math.nan


def task_score(
    results: Mapping[str, Any], task: str, metric: str | None = None, higher_is_better: bool | None = None
) -> TaskScore:
    """Pick the score of ``task`` from a loaded results dict.

    Args:
        results: A loaded lm-eval results dict.
        task: Task or group name.
        metric: Metric to read (``acc`` or ``acc,none``); default: first of :data:`PREFERRED_METRICS`.
        higher_is_better: Direction; default from the results file, else :data:`LOWER_IS_BETTER`.
    """
    entry = results["results"].get(task)
    if entry is None:
        raise KeyError(f"Task {task!r} is not in the results file; it has {sorted(results['results'])}.")
    if metric is None:
        available = _metric_names(entry)
        metric = next((m for m in PREFERRED_METRICS if m in available), None)
        if metric is None:
            raise KeyError(
                f"Task {task!r} reports none of {list(PREFERRED_METRICS)} (it has {available}); "
                "name its metric in the suite file or with --metrics."
            )
    key = _metric_key(task, entry, metric)
    name = key.split(",")[0]
    if higher_is_better is None:
        stated = results.get("higher_is_better", {}).get(task, {})
        higher_is_better = bool(stated.get(name, name not in LOWER_IS_BETTER))
    return TaskScore(task=task, metric=name, value=_to_float(entry[key]), higher_is_better=higher_is_better)


def task_scores(
    results: Mapping[str, Any],
    tasks: Sequence[str] | None = None,
    metrics: Mapping[str, str] | None = None,
    higher_is_better: Mapping[str, bool] | None = None,
) -> dict[str, TaskScore]:
    """Scores of several tasks; tasks absent from ``results`` are skipped (the caller compares sets).

    Args:
        results: A loaded lm-eval results dict.
        tasks: Tasks to read; default :func:`top_level_tasks`.
        metrics: Task -> metric overrides.
        higher_is_better: Task -> direction overrides.
    """
    metrics, directions = metrics or {}, higher_is_better or {}
    names = top_level_tasks(results) if tasks is None else [t for t in tasks if t in results["results"]]
    return {t: task_score(results, t, metrics.get(t), directions.get(t)) for t in names}


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_report(
    report: WinTieReport, teacher_label: str = "teacher", student_label: str = "student"
) -> str:
    """Markdown with the per-task table, the ``C_α`` table and α*.

    Args:
        report: The Win-and-Tie comparison.
        teacher_label: Column header for teacher scores.
        student_label: Column header for student scores.
    """
    lines = [
        f"| task | metric | {teacher_label} | {student_label} | recovery | win/tie at α=0 |",
        "|---|---|---:|---:|---:|:---:|",
    ]
    for t in report.tasks:
        arrow = "" if t.higher_is_better else " (lower is better)"
        lines.append(
            f"| {t.task} | {t.metric}{arrow} | {_fmt(t.teacher)} | {_fmt(t.student)} | "
            f"{_fmt(t.recovery, 3)} | {'yes' if t.wins_or_ties(0.0) else 'no'} |"
        )
    shown = [a for a in report.alphas if len(report.alphas) <= 12 or a in SUMMARY_ALPHAS]
    lines += ["", "| α | C_α |", "|---:|---:|"]
    lines += [f"| {a:.2f} | {report.coverage_at(a):.3f} |" for a in shown]
    star = "not reached on the grid" if math.isnan(report.alpha_star) else f"{report.alpha_star:.2f}"
    n_win = sum(t.wins_or_ties(0.0) for t in report.tasks)
    lines += [
        "",
        f"C_0 = {n_win}/{len(report.tasks)} = {report.coverage_at(0.0):.3f} "
        f"({'lossless' if report.lossless else 'not lossless'}: C_0 >= {LOSSLESS_THRESHOLD} is lossless); "
        f"α* = {star}",
    ]
    return "\n".join(lines) + "\n"


def coverage_figure(reports: Mapping[str, WinTieReport], title: str = "Win-and-Tie") -> Figure:
    """A matplotlib figure of ``C_α`` over α per student, with the lossless threshold and α*.

    Uses ``matplotlib.figure.Figure`` directly (no pyplot state, works headless).

    Args:
        reports: Curve label -> report (one curve per student).
        title: Axes title.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6), dpi=100)
    ax = fig.subplots()
    for label, report in reports.items():
        star = "none" if math.isnan(report.alpha_star) else f"{report.alpha_star:.2f}"
        (line,) = ax.step(report.alphas, report.coverage, where="post", label=f"{label} (α* = {star})")
        if not math.isnan(report.alpha_star):
            ax.axvline(report.alpha_star, color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(LOSSLESS_THRESHOLD, color="black", linestyle="--", linewidth=1, label="lossless (C_α = 0.5)")
    ax.set_xlabel("relative tolerance α")
    ax.set_ylabel("C_α (fraction of tasks won or tied)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def save_coverage_plot(
    reports: Mapping[str, WinTieReport], path: str | Path, title: str = "Win-and-Tie"
) -> Path:
    """Draw :func:`coverage_figure` into an image file (PNG, SVG or PDF by suffix).

    Args:
        reports: Curve label -> report.
        path: Output file; parent folders are created.
        title: Axes title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coverage_figure(reports, title).savefig(path)
    return path
