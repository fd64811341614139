"""Reading lm-eval results files, Markdown tables, the C_α plot and the `wintie` command."""

import json

import pytest

from lit_xdistill.eval.commands import compare_results, wintie
from lit_xdistill.eval.report import (
    coverage_figure,
    load_results,
    markdown_report,
    task_score,
    top_level_tasks,
)


def _results(scores: dict[str, dict[str, float]], subtasks: dict[str, list[str]] | None = None) -> dict:
    """A minimal lm-eval results dict: {task: {"acc": 0.5, ...}} -> {"results": {task: {"acc,none": ...}}}."""
    results = {
        task: {"alias": task, **{f"{m},none": v for m, v in metrics.items()}, "acc_stderr,none": 0.01}
        for task, metrics in scores.items()
    }
    hib = {task: {m: m != "perplexity" for m in metrics} for task, metrics in scores.items()}
    return {"results": results, "group_subtasks": subtasks or {}, "higher_is_better": hib}


TEACHER = _results(
    {
        "arc_easy": {"acc": 0.50, "acc_norm": 0.45},
        "lambada": {"acc": 0.30, "perplexity": 20.0},
        "mmlu": {"acc": 0.30},
        "mmlu_anatomy": {"acc": 0.10},
    },
    {"mmlu": ["mmlu_anatomy"]},
)
STUDENT = _results(
    {
        "arc_easy": {"acc": 0.52, "acc_norm": 0.40},
        "lambada": {"acc": 0.25, "perplexity": 21.0},
        "mmlu": {"acc": 0.29},
        "mmlu_anatomy": {"acc": 0.90},
    },
    {"mmlu": ["mmlu_anatomy"]},
)


def test_top_level_tasks_skip_group_members():
    assert top_level_tasks(TEACHER) == ["arc_easy", "lambada", "mmlu"]


def test_metric_choice_and_direction():
    assert task_score(TEACHER, "arc_easy").metric == "acc_norm"  # preferred over acc by default
    ppl = task_score(TEACHER, "lambada", "perplexity")
    assert (ppl.value, ppl.higher_is_better) == (20.0, False)
    assert task_score({"results": {"t": {"perplexity,none": 3.0}}}, "t").higher_is_better is False
    with pytest.raises(KeyError, match=r"no metric 'f1'.*\['acc', 'acc_norm'\]"):
        task_score(TEACHER, "arc_easy", "f1")
    with pytest.raises(KeyError, match="not in the results file"):
        task_score(TEACHER, "boolq")


def test_compare_results_with_metric_overrides():
    report = compare_results(TEACHER, STUDENT, metrics={"arc_easy": "acc", "lambada": "perplexity"})
    rows = {t.task: t for t in report.tasks}
    assert set(rows) == {"arc_easy", "lambada", "mmlu"}
    assert rows["arc_easy"].wins_or_ties(0.0)
    assert not rows["lambada"].higher_is_better and rows["lambada"].wins_or_ties(0.05)
    assert report.coverage_at(0.0) == pytest.approx(1 / 3)
    assert report.alpha_star == pytest.approx(0.04)  # mmlu 0.29/0.30 ties at α >= 1/30


def test_na_scores_are_rejected():
    student = json.loads(json.dumps(STUDENT))
    student["results"]["mmlu"]["acc,none"] = "N/A"
    with pytest.raises(ValueError, match=r"\['mmlu'\]"):
        compare_results(TEACHER, student)


def test_markdown_report_lists_tasks_table_and_alpha_star():
    text = markdown_report(compare_results(TEACHER, STUDENT, metrics={"lambada": "perplexity"}))
    assert "| lambada | perplexity (lower is better) | 20.0000 | 21.0000 | 0.952 | no |" in text
    assert "| 0.05 | 0.667 |" in text and "| 0.20 | 1.000 |" in text
    assert "C_0 = 0/3 = 0.000 (not lossless" in text and "α* = 0.05" in text


def test_coverage_figure_has_curve_and_lossless_line():
    fig = coverage_figure({"student": compare_results(TEACHER, STUDENT)})
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(label.startswith("student (α* = ") for label in labels)
    assert "lossless (C_α = 0.5)" in labels


def test_wintie_command_prints_tables_and_writes_plot_and_report(tmp_path, capsys):
    teacher, student = tmp_path / "teacher.json", tmp_path / "student.json"
    teacher.write_text(json.dumps(TEACHER))
    student.write_text(json.dumps(STUDENT))
    wintie(str(teacher), str(student), plot=str(tmp_path / "c.png"), report=str(tmp_path / "r.md"))
    out = capsys.readouterr().out
    assert "| arc_easy | acc_norm | 0.4500 | 0.4000 |" in out and "α* =" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "r.md").read_text() in out


def test_wintie_command_with_suite_checks_task_sets(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: arc_easy, metric: acc}\n  - {task: boolq, metric: acc}\n")
    with pytest.raises(ValueError, match="boolq"):
        compare_results(TEACHER, STUDENT, suite=str(suite))
    report = compare_results(TEACHER, STUDENT, suite=str(suite), intersect=True)
    assert [(t.task, t.metric, t.student) for t in report.tasks] == [("arc_easy", "acc", 0.52)]


def test_mismatched_task_sets_between_files(tmp_path):
    student = json.loads(json.dumps(STUDENT))
    del student["results"]["lambada"]
    with pytest.raises(ValueError, match=r"only the teacher has \['lambada'\]"):
        compare_results(TEACHER, student)
    assert len(compare_results(TEACHER, student, intersect=True).tasks) == 2


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="results file"):
        load_results(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not an lm-eval results file"):
        load_results(tmp_path / "x.json")
