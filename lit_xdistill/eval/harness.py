"""Run an evaluation suite on a model object with lm-eval, and cache teacher results on disk.

The model goes through lm-eval's own HF wrapper, ``HFLM(pretrained=model, tokenizer=tokenizer,
backend="causal")``, subclassed only to tokenize each task in one batched call: log-likelihood requests are
right-padded into batches and scored without an attention mask, which is exact for any strictly causal model
(the padding comes after every scored token). Shots are set per suite entry (a group's subtasks inherit its
shots) and the per-task item limit selects the *first* ``limit`` items of each task; a group spreads it evenly
over its subtasks (MMLU at limit 200 scores the first 4 items of each of its 57 subjects), so a limited run
costs about the same per suite entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_xdistill.eval.tasks import DEFAULT_CACHE_DIR, OFFLINE_TASKS, EvalSuite, load_suite, render_tasks

if TYPE_CHECKING:
    import torch
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lit_xdistill.teachers import TeacherSpec


def task_manager(suite: EvalSuite, cache_dir: str | Path | None = None) -> TaskManager:
    """An lm-eval ``TaskManager`` that knows the suite's tasks, or a clear error naming unknown ones.

    lm-eval's built-in task index is only scanned (slow: thousands of YAMLs) when the suite names a
    task that is not offline.

    Args:
        suite: The suite to check.
        cache_dir: Cache root for rendered task YAMLs; default ``~/.cache/lit_xdistill``.
    """
    from lm_eval.tasks import TaskManager

    names = suite.task_names
    needs_registry = any(n not in OFFLINE_TASKS for n in names)
    manager = TaskManager(include_path=str(render_tasks(names, cache_dir)), include_defaults=needs_registry)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"Suite {suite.name!r} names unknown tasks {unknown}. Offline tasks are {sorted(OFFLINE_TASKS)}; "
            "other names must be lm-eval tasks (see `lm_eval ls tasks`), which need the HF hub."
        )
    return manager


def effective_limit(suite: EvalSuite, limit: int | None) -> int | None:
    """The per-task item limit to use: ``limit`` if given (0 meaning full sets), else the suite's.

    Args:
        suite: The suite whose ``limit`` is the default.
        limit: Caller's limit.
    """
    limit = suite.limit if limit is None else limit
    return limit or None


def _leaves(name: str, group_map: dict[str, list[str]]) -> list[str]:
    if name not in group_map:
        return [name]
    return [leaf for child in group_map[name] for leaf in _leaves(child, group_map)]


def _item_indices(manager: TaskManager, suite: EvalSuite, limit: int | None) -> dict[str, list[int]] | None:
    """Per-leaf item indices for ``limit`` (``None``: full sets); loads the suite to find group leaves."""
    if limit is None:
        return None
    loaded = manager.load(suite.task_names)
    group_map = loaded.get("group_map", {})
    samples: dict[str, list[int]] = {}
    for entry in suite.tasks:
        leaves = _leaves(entry.task, group_map)
        per_leaf = math.ceil(limit / len(leaves))
        for leaf in leaves:
            samples[leaf] = list(range(min(per_leaf, len(loaded["tasks"][leaf].eval_docs))))
    return samples


class _SuiteTaskManager:
    """Wraps a TaskManager so that every loaded leaf task gets its suite entry's shots."""

    def __init__(self, manager: TaskManager, suite: EvalSuite) -> None:
        self._manager, self._suite = manager, suite

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def load(self, task_list: Any) -> Any:
        loaded = self._manager.load(task_list)
        group_map = loaded.get("group_map", {})
        for entry in self._suite.tasks:
            for leaf in _leaves(entry.task, group_map):
                if leaf in loaded["tasks"]:
                    loaded["tasks"][leaf].set_config(key="num_fewshot", value=entry.shots)
        return loaded


@functools.cache
def _batch_tokenizing_hflm() -> type:
    """lm-eval's ``HFLM`` with each log-likelihood task tokenized in one batched tokenizer call.

    Stock ``HFLM.loglikelihood`` encodes request by request, each context twice (alone and with its
    continuation) and once per answer choice. Here every distinct string that ``_encode_pair`` will ask for is
    encoded once up front by the fast tokenizer's batch call (Rust, all cores), and ``tok_encode`` serves those
    strings from that table; the token ids are identical (tested against stock lm-eval on real tasks), any other
    call goes to lm-eval unchanged. On a 2-core CPU, tokenizing HellaSwag's full set (40,168 requests of ~860
    tokens, 10-shot) took 180 s stock and 57 s batched, MMLU's (56,168, 5-shot) 199 s and 81 s
    (docs/evaluation.md).
    """
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
    from tqdm import tqdm

    class BatchTokenizingHFLM(HFLM):
        _encoded: dict[str, list[int]] = {}

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            strings = set()
            for context, continuation in (req.args for req in requests):
                if context:  # _encode_pair encodes the whole text and the context less its trailing spaces
                    strings.update((context.rstrip(), context + continuation))
            self._encoded = self._encode_all(sorted(strings))
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._encoded = {}

        def _encode_all(self, strings: list[str]) -> dict[str, list[int]]:
            """What ``tok_encode(s)`` gives for each string, by one batched call per special-token setting."""
            bos = self.tokenizer.decode(self.prefix_token_id)
            groups: dict[bool, list[str]] = {}
            for text in strings:  # tok_encode's rule: no special tokens if the text starts with BOS already
                groups.setdefault(has_bos_prefix(text, bos), []).append(text)
            encoded, default = {}, _add_special_kwargs(None, self.add_bos_token)
            with tqdm(total=len(strings), desc="Tokenizing inputs (batched)", disable=self.rank != 0) as bar:
                for starts_with_bos, texts in groups.items():
                    kwargs = {"add_special_tokens": False} if starts_with_bos else default
                    for start in range(0, len(texts), 2048):  # batches of 2,048: all cores, and a progress bar
                        batch = texts[start : start + 2048]
                        encoded.update(zip(batch, self.tokenizer(batch, **kwargs)["input_ids"]))
                        bar.update(len(batch))
            return encoded

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            if add_special_tokens is None and not left_truncate_len and not kwargs and string in self._encoded:
                return list(self._encoded[string])
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)

    return BatchTokenizingHFLM


def run_suite(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    suite: str | Path | EvalSuite,
    limit: int | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    bootstrap_iters: int = 100,
) -> dict[str, Any]:
    """Evaluate a causal LM on a suite; returns lm-eval's results dict (JSON-serialisable, no samples).

    The model is put in eval mode (lm-eval does so) and stays on its current device.

    Args:
        model: A causal LM whose ``forward(input_ids).logits`` has shape (B, S, V).
        tokenizer: Its tokenizer.
        suite: Suite YAML path, suite name under ``configs/eval/``, or an ``EvalSuite``.
        limit: Items per task (the first ``limit``); ``None``: the suite's ``limit``; 0: full sets.
        batch_size: Requests per forward pass.
        cache_dir: Cache root for rendered tasks; default ``~/.cache/lit_xdistill``.
        bootstrap_iters: Bootstrap draws for standard errors of non-mean metrics (perplexity); 0
            skips all standard errors and lm-eval's bootstrap process pool.
    """
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    suite = load_suite(suite)
    limit = effective_limit(suite, limit)
    manager = task_manager(suite, cache_dir)
    samples = _item_indices(manager, suite, limit)
    lm = _batch_tokenizing_hflm()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=suite.task_names,
        task_manager=_SuiteTaskManager(manager, suite),
        samples=samples,
        log_samples=False,
        bootstrap_iters=bootstrap_iters,
    )
    results.pop("samples", None)
    results["lit_xdistill"] = {
        "suite": suite.name,
        "shots": {t.task: t.shots for t in suite.tasks},
        "limit": limit,
    }
    return json.loads(json.dumps(results, default=handle_non_serializable))


def resolve_teacher(teacher: TeacherSpec | str) -> TeacherSpec:
    """A ``TeacherSpec`` from a spec or from a built-in name / local path / hub id string.

    Args:
        teacher: A ``TeacherSpec`` or a name such as ``smollm2-135m-instruct``.
    """
    if not isinstance(teacher, str):
        return teacher
    from lit_xdistill.teachers import TeacherSpec

    return TeacherSpec(teacher)


def teacher_cache_path(
    teacher: TeacherSpec, suite: EvalSuite, limit: int | None, cache_dir: str | Path | None = None
) -> Path:
    """Where the teacher's results for (teacher identity and dtype, suite tasks + shots, limit) are cached.

    Args:
        teacher: The teacher (its ``identity`` and ``torch_dtype()`` are the key: scores depend on the precision).
        suite: The suite (its task names and shots are the key; metrics are read at comparison time).
        limit: Items per task.
        cache_dir: Cache root; default ``~/.cache/lit_xdistill``.
    """
    import lm_eval

    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    key = json.dumps([teacher.identity, str(teacher.torch_dtype()), suite.fingerprint(), limit,
                      getattr(lm_eval, "__version__", "")])
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in teacher.identity)[-60:]
    return (
        root / "teacher_results" / f"{slug}-{suite.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    )


def teacher_results(
    teacher: TeacherSpec | str,
    suite: str | Path | EvalSuite,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """The teacher's results on a suite, computed once and then read from the on-disk cache.

    Args:
        teacher: A ``TeacherSpec`` or a teacher name/path resolved through it.
        suite: Suite YAML path, suite name, or an ``EvalSuite``.
        limit: Items per task; ``None``: the suite's ``limit``; 0: full sets.
        batch_size: Requests per forward pass.
        device: Device to run the teacher on (it is loaded there and freed afterwards).
        cache_dir: Cache root; default ``~/.cache/lit_xdistill``.
        refresh: Recompute even when a cached result exists.
    """
    spec, suite = resolve_teacher(teacher), load_suite(suite)
    limit = effective_limit(suite, limit)
    path = teacher_cache_path(spec, suite, limit, cache_dir)
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    model = spec.load_model().to(device)
    results = run_suite(model, spec.load_tokenizer(), suite, limit, batch_size, cache_dir)
    results["lit_xdistill"]["teacher"] = spec.identity
    del model
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    return results
