"""Win-and-Tie: the paper's per-task test of "lossless" distillation.

For each task b with teacher score T(b) and student score S(b):

* higher-is-better metrics (accuracy, exact match, ...): the student *wins or ties* at relative
  tolerance α when ``S(b) >= T(b) - α·|T(b)|``, i.e. ``S >= (1 - α)·T`` for the usual T >= 0;
* lower-is-better metrics (perplexity, bits per byte, ...): ``S(b) <= T(b) + α·|T(b)|``, i.e.
  ``S <= (1 + α)·T``.

Using ``|T|`` keeps the tolerance a loosening for negative scores too (e.g. log-likelihoods); for the
non-negative scores of lm-eval it is exactly the paper's rule. Comparisons allow a relative slack of
1e-12 so that grid values such as ``0.01 * 5`` do not flip exact boundary cases.

``C_α`` is the fraction of tasks that win or tie at α, the run is lossless when ``C_0 >= 0.5``, and
the critical tolerance ``α*`` is the smallest α on the grid with ``C_α >= 0.5`` (``nan`` when no grid
point reaches it). Recovery is ``S/T`` (for lower-is-better metrics ``T/S``, so that > 1 always means
the student is better); it is ``nan`` when the denominator is zero.

Rules for imperfect inputs (all raise ``ValueError`` with the offending task names):

* a task present on only one side: error, unless ``intersect=True`` asks to compare the common tasks
  (then at least one task must remain);
* a NaN or infinite score: error (a broken evaluation must not count as a loss or a win);
* a zero teacher score is allowed: recovery is ``nan`` and win-or-tie reduces to ``S >= 0``
  (``S <= 0`` for lower-is-better).

The pure functions here use only the standard library; :class:`WinTieMetric` wraps them as a
torchmetrics ``Metric`` whose per-task score states concatenate across processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.01 * i, 2) for i in range(51))
"""The α grid used by default: 0.00, 0.01, ..., 0.50."""

LOSSLESS_THRESHOLD = 0.5
"""``C_α`` at or above this fraction counts as lossless at tolerance α."""

_SLACK = 1e-12


@dataclass(frozen=True)
class TaskComparison:
    """Teacher and student score of one task.

    Args:
        task: Task name (e.g. ``arc_easy``).
        teacher: Teacher score T.
        student: Student score S.
        higher_is_better: Direction of the metric; ``False`` for perplexity-like metrics.
        metric: Name of the metric the scores come from (for reports only).
    """

    task: str
    teacher: float
    student: float
    higher_is_better: bool = True
    metric: str = ""

    def wins_or_ties(self, alpha: float) -> bool:
        """Whether the student wins or ties at relative tolerance ``alpha``."""
        return win_or_tie(self.student, self.teacher, alpha, self.higher_is_better)

    @property
    def recovery(self) -> float:
        """``S/T`` (``T/S`` for lower-is-better); ``nan`` when the denominator is zero."""
        num, den = (self.student, self.teacher) if self.higher_is_better else (self.teacher, self.student)
        return num / den if den != 0 else math.nan


@dataclass(frozen=True)
class WinTieReport:
    """Win-and-Tie summary of one student against one teacher.

    Args:
        tasks: One comparison per task, in input order.
        alphas: The α grid, ascending.
        coverage: ``C_α`` for each α of the grid.
        alpha_star: Smallest α of the grid with ``C_α >= 0.5``; ``nan`` if none.
    """

    tasks: tuple[TaskComparison, ...]
    alphas: tuple[float, ...]
    coverage: tuple[float, ...]
    alpha_star: float

    def coverage_at(self, alpha: float) -> float:
        """``C_α`` at any ``alpha`` (need not be on the grid)."""
        return coverage(self.tasks, alpha)

    @property
    def lossless(self) -> bool:
        """``C_0 >= 0.5``."""
        return self.coverage_at(0.0) >= LOSSLESS_THRESHOLD


def win_or_tie(student: float, teacher: float, alpha: float, higher_is_better: bool = True) -> bool:
    """Whether score ``student`` wins or ties ``teacher`` at relative tolerance ``alpha``.

    Args:
        student: Student score S.
        teacher: Teacher score T.
        alpha: Relative tolerance (0 means the student must match or beat the teacher).
        higher_is_better: Direction of the metric.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    slack = _SLACK * max(abs(teacher), abs(student), 1.0)
    if higher_is_better:
        return student >= teacher - alpha * abs(teacher) - slack
    return student <= teacher + alpha * abs(teacher) + slack


def coverage(tasks: Sequence[TaskComparison], alpha: float) -> float:
    """``C_α``: fraction of ``tasks`` whose student wins or ties at ``alpha``.

    Args:
        tasks: Per-task comparisons (at least one).
        alpha: Relative tolerance.
    """
    if not tasks:
        raise ValueError("Win-and-Tie needs at least one task")
    return sum(t.wins_or_ties(alpha) for t in tasks) / len(tasks)


def critical_tolerance(alphas: Sequence[float], coverages: Sequence[float]) -> float:
    """α*: the smallest grid α with ``C_α >= 0.5``, or ``nan`` when the grid never reaches it.

    Args:
        alphas: Ascending α grid.
        coverages: ``C_α`` for each grid point.
    """
    for alpha, c in zip(alphas, coverages, strict=True):
        if c >= LOSSLESS_THRESHOLD:
            return alpha
    return math.nan


def _check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(float(a) for a in alphas)
    if not grid or any(a < 0 for a in grid) or list(grid) != sorted(grid):
        raise ValueError(f"alphas must be a non-empty ascending grid of values >= 0, got {list(grid)}")
    return grid


def compare(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    higher_is_better: Mapping[str, bool] | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    intersect: bool = False,
    metrics: Mapping[str, str] | None = None,
) -> WinTieReport:
    """Compare per-task scores of a student with its teacher.

    Args:
        teacher: Task name -> teacher score.
        student: Task name -> student score.
        higher_is_better: Task name -> metric direction; tasks not listed are higher-is-better.
        alphas: Ascending α grid for ``C_α`` and α*.
        intersect: Compare only the tasks both sides have instead of raising on a mismatch.
        metrics: Task name -> metric name, carried into the report.
    """
    grid = _check_alphas(alphas)
    only_teacher = sorted(set(teacher) - set(student))
    only_student = sorted(set(student) - set(teacher))
    if (only_teacher or only_student) and not intersect:
        raise ValueError(
            f"Task sets differ: only the teacher has {only_teacher}, only the student has "
            f"{only_student}. Evaluate both on the same suite, or pass intersect=True "
            "(--intersect) to compare the common tasks only."
        )
    names = [name for name in teacher if name in student]
    if not names:
        raise ValueError("Teacher and student share no task: nothing to compare.")
    bad = [n for n in names if not (math.isfinite(teacher[n]) and math.isfinite(student[n]))]
    if bad:
        raise ValueError(
            f"Non-finite (NaN/inf) scores for tasks {bad}: "
            f"{ {n: (teacher[n], student[n]) for n in bad} }. Re-run the evaluation of those tasks."
        )
    directions = higher_is_better or {}
    metric_names = metrics or {}
    tasks = tuple(
        TaskComparison(
            task=n,
            teacher=float(teacher[n]),
            student=float(student[n]),
            higher_is_better=bool(directions.get(n, True)),
            metric=metric_names.get(n, ""),
        )
        for n in names
    )
    covs = tuple(coverage(tasks, a) for a in grid)
    return WinTieReport(tasks=tasks, alphas=grid, coverage=covs, alpha_star=critical_tolerance(grid, covs))


class WinTieMetric(Metric):
    """Win-and-Tie as a torchmetrics ``Metric``.

    ``update`` takes per-task student and teacher scores (1-D tensors, one entry per task); states are
    concatenated across processes, so each process may contribute a different subset of tasks.
    ``compute`` returns a dict of tensors: ``alphas``, ``coverage`` (``C_α`` per grid point),
    ``alpha_star`` (``nan`` if never lossless on the grid), ``recovery`` (per task, in update order)
    and ``win_or_tie`` (per task at α = 0).

    Args:
        alphas: Ascending α grid.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alphas = _check_alphas(alphas)
        self.add_state("student", default=[], dist_reduce_fx="cat")
        self.add_state("teacher", default=[], dist_reduce_fx="cat")
        self.add_state("higher", default=[], dist_reduce_fx="cat")

    def update(
        self, student: torch.Tensor, teacher: torch.Tensor, higher_is_better: torch.Tensor | None = None
    ) -> None:
        """Add tasks.

        Args:
            student: Student scores, shape (num_tasks,).
            teacher: Teacher scores, shape (num_tasks,).
            higher_is_better: Metric direction per task, bool of shape (num_tasks,); default all True.
        """
        student = torch.as_tensor(student, dtype=torch.float64).flatten()
        teacher = torch.as_tensor(teacher, dtype=torch.float64).flatten()
        if student.shape != teacher.shape:
            raise ValueError(f"student has {student.numel()} scores but teacher has {teacher.numel()}")
        if higher_is_better is None:
            higher_is_better = torch.ones_like(student, dtype=torch.bool)
        self.student.append(student.to(self.device))
        self.teacher.append(teacher.to(self.device))
        self.higher.append(torch.as_tensor(higher_is_better, dtype=torch.bool).flatten().to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        """Return ``alphas``, ``coverage``, ``alpha_star``, ``recovery`` and ``win_or_tie``."""
        cat = lambda xs: torch.cat(xs) if isinstance(xs, list) else xs
        s, t, h = (cat(x).tolist() for x in (self.student, self.teacher, self.higher))
        names = [f"task_{i}" for i in range(len(s))]
        report = compare(
            dict(zip(names, t)), dict(zip(names, s)), dict(zip(names, map(bool, h))), self.alphas
        )
        return {
            "alphas": torch.tensor(report.alphas, dtype=torch.float64),
            "coverage": torch.tensor(report.coverage, dtype=torch.float64),
            "alpha_star": torch.tensor(report.alpha_star, dtype=torch.float64),
            "recovery": torch.tensor([x.recovery for x in report.tasks], dtype=torch.float64),
            "win_or_tie": torch.tensor([x.wins_or_ties(0.0) for x in report.tasks]),
        }
