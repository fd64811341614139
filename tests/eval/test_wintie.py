"""Win-and-Tie math and the torchmetrics wrapper."""

import math

import pytest
import torch

from lit_xdistill.eval.wintie import (
    DEFAULT_ALPHAS,
    TaskComparison,
    WinTieMetric,
    compare,
    critical_tolerance,
    win_or_tie,
)

# Published teacher/student scores (Llama-3.1-8B vs its xLSTM student), issue 5.
PUBLISHED = {
    "piqa": (80.1, 80.0),
    "arc_easy": (81.6, 82.9),
    "arc_challenge": (57.8, 55.9),
    "hellaswag": (81.9, 82.3),
    "winogrande": (76.9, 79.0),
    "mmlu": (65.9, 66.1),
    "gpqa_diamond": (10.6, 17.7),
    "gpqa": (13.8, 15.8),
    "gsm8k": (48.4, 57.8),
    "humaneval": (35.4, 39.0),
    "humaneval_plus": (29.9, 23.8),
    "mbpp": (48.4, 42.8),
    "mbpp_plus": (61.9, 56.9),
}


def _split(pairs):
    return {k: t for k, (t, _) in pairs.items()}, {k: s for k, (_, s) in pairs.items()}


def test_published_numbers_give_c0_8_of_13_and_alpha_star_zero():
    report = compare(*_split(PUBLISHED))
    assert report.coverage_at(0.0) == pytest.approx(8 / 13)
    assert report.coverage[0] == pytest.approx(8 / 13)
    assert report.alpha_star == 0.0
    assert report.lossless
    losers = {t.task for t in report.tasks if not t.wins_or_ties(0.0)}
    assert losers == {"piqa", "arc_challenge", "humaneval_plus", "mbpp", "mbpp_plus"}
    # Student/teacher ratios of the losers: PIQA 0.9988, ARC-c 0.967, MBPP+ 0.919, MBPP 0.884, HE+ 0.796.
    expected = {0.01: 9, 0.04: 10, 0.09: 11, 0.12: 12, 0.20: 12, 0.21: 13}
    for alpha, n in expected.items():
        assert report.coverage_at(alpha) == pytest.approx(n / 13), alpha


def test_coverage_is_monotone_in_alpha():
    report = compare(*_split(PUBLISHED))
    assert list(report.coverage) == sorted(report.coverage)
    assert report.alphas == DEFAULT_ALPHAS and len(DEFAULT_ALPHAS) == 51 and DEFAULT_ALPHAS[-1] == 0.5


def test_boundary_is_inclusive_on_the_grid():
    # S = 0.95 T ties at α = 0.05 exactly, although 1 - 0.01*5 is not exactly 0.95 in floating point.
    assert win_or_tie(0.95, 1.0, DEFAULT_ALPHAS[5])
    assert not win_or_tie(0.95, 1.0, DEFAULT_ALPHAS[4])
    assert win_or_tie(0.5, 0.5, 0.0)


def test_alpha_star_is_the_first_grid_point_reaching_one_half():
    report = compare({"a": 1.0, "b": 1.0}, {"a": 0.97, "b": 0.90})
    assert report.coverage_at(0.0) == 0.0
    assert report.alpha_star == pytest.approx(0.03)
    assert report.coverage_at(0.1) == 1.0


def test_alpha_star_is_nan_when_never_lossless_on_the_grid():
    report = compare({"a": 1.0, "b": 1.0}, {"a": 0.1, "b": 0.2}, alphas=[0.0, 0.1, 0.5])
    assert math.isnan(report.alpha_star)
    assert critical_tolerance([0.0, 0.1], [0.4, 0.5]) == 0.1


def test_lower_is_better_uses_upper_relative_bound():
    # perplexity 10 vs teacher 9.6: worse by 4.2 %, ties at α = 0.05, not at 0.04
    t = TaskComparison("lambada", teacher=9.6, student=10.0, higher_is_better=False)
    assert not t.wins_or_ties(0.0) and not t.wins_or_ties(0.04) and t.wins_or_ties(0.05)
    assert t.recovery == pytest.approx(0.96)  # > 1 would mean the student is better
    assert TaskComparison("x", 9.6, 9.0, higher_is_better=False).wins_or_ties(0.0)


def test_zero_teacher_score_gives_nan_recovery_and_s_ge_0_rule():
    report = compare({"zero": 0.0}, {"zero": 0.0})
    assert math.isnan(report.tasks[0].recovery)
    assert report.coverage_at(0.0) == 1.0
    assert not win_or_tie(-0.1, 0.0, 0.5)


def test_negative_scores_use_absolute_tolerance():
    assert win_or_tie(-1.04, -1.0, 0.05) and not win_or_tie(-1.06, -1.0, 0.05)


def test_missing_tasks_raise_naming_them_unless_intersect():
    with pytest.raises(ValueError, match=r"only the teacher has \['b'\].*only the student has \['c'\]"):
        compare({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 1.0})
    report = compare({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 1.0}, intersect=True)
    assert [t.task for t in report.tasks] == ["a"]
    with pytest.raises(ValueError, match="share no task"):
        compare({"b": 1.0}, {"c": 1.0}, intersect=True)


def test_nan_scores_raise_naming_the_task():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        compare({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="alphas"):
        compare({"a": 1.0}, {"a": 1.0}, alphas=[0.1, 0.0])
    with pytest.raises(ValueError, match="alpha must be"):
        win_or_tie(1.0, 1.0, -0.1)


def test_metric_matches_pure_function_across_updates():
    teacher, student = _split(PUBLISHED)
    names = list(PUBLISHED)
    metric = WinTieMetric()
    metric.update(
        torch.tensor([student[n] for n in names[:6]]), torch.tensor([teacher[n] for n in names[:6]])
    )
    metric.update(
        torch.tensor([student[n] for n in names[6:]]), torch.tensor([teacher[n] for n in names[6:]])
    )
    out = metric.compute()
    report = compare(teacher, student)
    assert out["coverage"].tolist() == pytest.approx(list(report.coverage))
    assert out["coverage"][0].item() == pytest.approx(8 / 13)
    assert out["alpha_star"].item() == 0.0
    assert out["recovery"].tolist() == pytest.approx([t.recovery for t in report.tasks])
    assert out["win_or_tie"].sum().item() == 8
    metric.reset()
    metric.update(torch.tensor([10.0]), torch.tensor([9.0]), torch.tensor([False]))
    assert metric.compute()["coverage"][0].item() == 0.0
    with pytest.raises(ValueError, match="scores"):
        metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))
