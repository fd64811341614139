"""The ``wintie`` and ``evaluate`` commands (plain functions; the CLI exposes them as subcommands)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lit_xdistill.eval.report import load_results, markdown_report, save_coverage_plot, task_scores
from lit_xdistill.eval.tasks import load_suite
from lit_xdistill.eval.wintie import DEFAULT_ALPHAS, WinTieReport, compare


def compare_results(
    teacher_results: dict,
    student_results: dict,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    suite: str | None = None,
    metrics: dict[str, str] | None = None,
    intersect: bool = False,
) -> WinTieReport:
    """Win-and-Tie of two loaded lm-eval results dicts.

    Args:
        teacher_results: The teacher's lm-eval results dict.
        student_results: The student's lm-eval results dict.
        alphas: Ascending α grid.
        suite: Suite (path or name) whose tasks, metrics and directions to use; default all top-level
            tasks of the files with lm-eval's directions and the first preferred metric.
        metrics: Task -> metric overrides (win over the suite's).
        intersect: Compare the tasks both files have instead of failing on a mismatch.
    """
    tasks, suite_metrics, directions = None, {}, {}
    if suite is not None:
        loaded = load_suite(suite)
        tasks, suite_metrics, directions = loaded.task_names, loaded.metrics, loaded.directions
    chosen = {**suite_metrics, **(metrics or {})}
    teacher = task_scores(teacher_results, tasks, chosen, directions)
    student = task_scores(student_results, tasks, chosen, directions)
    if tasks is not None and not intersect:
        missing = {
            side: [t for t in tasks if t not in scores]
            for side, scores in (("teacher", teacher), ("student", student))
        }
        if any(missing.values()):
            raise ValueError(
                f"Suite tasks missing from the results files: {missing}. Evaluate both on the suite, "
                "or pass --intersect to compare the common tasks only."
            )
    for name in set(teacher) & set(student):
        if teacher[name].metric != student[name].metric:
            raise ValueError(
                f"Task {name!r}: teacher reports {teacher[name].metric}, student {student[name].metric}; "
                "name the metric in the suite or with --metrics."
            )
    return compare(
        teacher={n: s.value for n, s in teacher.items()},
        student={n: s.value for n, s in student.items()},
        higher_is_better={n: s.higher_is_better for n, s in teacher.items()},
        alphas=alphas,
        intersect=intersect,
        metrics={n: s.metric for n, s in teacher.items()},
    )


def wintie(
    teacher_results: str,
    student_results: str,
    plot: str | None = None,
    alphas: list[float] | None = None,
    suite: str | None = None,
    metrics: dict[str, str] | None = None,
    intersect: bool = False,
    report: str | None = None,
) -> None:
    """Compare a student's lm-eval results with its teacher's by Win-and-Tie.

    Prints per task both scores, the recovery S/T and win/tie at α = 0, then the C_α table and α*
    (the smallest α with C_α >= 0.5; lower is better).

    Args:
        teacher_results: Teacher results JSON written by lm-eval (or by ``evaluate``).
        student_results: Student results JSON written by lm-eval (or by ``evaluate``).
        plot: Draw the C_α curve into this image file (e.g. wintie.png).
        alphas: Tolerance grid, ascending; default 0.00, 0.01, ..., 0.50.
        suite: Suite YAML (or name under configs/eval) fixing the tasks, metrics and directions;
            default every top-level task of the files, metric acc_norm > acc > exact_match > ...
        metrics: Per-task metric overrides, e.g. {"lambada": "perplexity"}.
        intersect: Compare only the tasks present in both files instead of failing on a mismatch.
        report: Also write the Markdown report to this file.
    """
    result = compare_results(
        load_results(teacher_results),
        load_results(student_results),
        alphas or DEFAULT_ALPHAS,
        suite,
        metrics,
        intersect,
    )
    text = markdown_report(result)
    print(text)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(text)
    if plot:
        print(f"C_α curve written to {save_coverage_plot({Path(student_results).stem: result}, plot)}")


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate(
    student: str,
    teacher: str,
    suite: str = "configs/eval/default.yaml",
    out_dir: str = "runs/eval",
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
) -> Path:
    """Evaluate a student and its teacher on a suite and write the Win-and-Tie report.

    Writes ``teacher.json`` and ``student.json`` (lm-eval results), ``report.md`` and ``wintie.png``
    into ``out_dir`` and returns it. Teacher results are cached per teacher + suite + limit under
    ``~/.cache/lit_xdistill/teacher_results``.

    Args:
        student: Student checkpoint folder (``save_pretrained`` output of an XDistillForCausalLM); its
            tokenizer is read from the same folder, else the teacher's is used.
        teacher: Teacher name (e.g. smollm2-135m-instruct), local folder or hub id, as TeacherSpec takes.
        suite: Suite YAML path, or a suite name under configs/eval (default, quick).
        out_dir: Output folder, e.g. runs/<experiment>/eval.
        limit: Items per task (the first N); default the suite's limit; 0 for the full sets.
        batch_size: Requests per forward pass.
        device: cpu, cuda, cuda:1, ... or auto (cuda when available).
    """
    from lit_xdistill.eval.harness import resolve_teacher, run_suite, task_manager, teacher_results

    loaded_suite, device = load_suite(suite), _device(device)
    task_manager(loaded_suite)  # fail on unknown tasks or missing data before loading any model
    spec = resolve_teacher(teacher)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # everything goes to a temporary folder renamed into place at the end: a crash never leaves a
    # half-written report that looks complete
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        teacher_json = teacher_results(spec, loaded_suite, limit, batch_size, device)
        (tmp / "teacher.json").write_text(json.dumps(teacher_json, indent=2))
        model, tokenizer = load_exported_student(student, spec)
        student_json = run_suite(model.to(device), tokenizer, loaded_suite, limit, batch_size)
        (tmp / "student.json").write_text(json.dumps(student_json, indent=2))
        result = compare_results(teacher_json, student_json, suite=suite)
        text = markdown_report(result, teacher_label=f"teacher ({spec.identity})", student_label="student")
        (tmp / "report.md").write_text(
            f"# Win-and-Tie: {student} vs {spec.identity}, suite {loaded_suite.name}\n\n{text}"
        )
        save_coverage_plot({Path(student).name or "student": result}, tmp / "wintie.png")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(text)
    return out


def student_tokenizer(folder: str | Path, teacher):
    """The tokenizer saved with an exported student, else its teacher's.

    Args:
        folder: the student folder (``save_pretrained`` output).
        teacher: its ``TeacherSpec`` (the fallback's source).
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(folder) if has_tokenizer else teacher.load_tokenizer()


def load_exported_student(student: str | Path, teacher):
    """An exported student (registered Auto class) in its teacher's dtype, and its tokenizer
    (:func:`student_tokenizer`).

    The teacher's dtype (``TeacherSpec.torch_dtype()``, bf16 by default) so that Win-and-Tie compares models run
    at the same precision. Left at its checkpoint's dtype, an export holds fp32 master weights, and every
    matmul and mLSTM kernel of the student would run in fp32 beside a bf16 teacher.

    Args:
        student: the student folder (``save_pretrained`` output).
        teacher: its ``TeacherSpec``.
    """
    from transformers import AutoModelForCausalLM

    import lit_xdistill  # noqa: F401  (registers XDistillForCausalLM with the Auto classes)

    folder = Path(student)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"No student checkpoint at {folder}: pass a folder written by save_pretrained."
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=teacher.torch_dtype())
    return model, student_tokenizer(folder, teacher)
