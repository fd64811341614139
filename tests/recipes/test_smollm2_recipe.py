"""The SmolLM2 recipe (runs/smollm2, configs/smollm2): every config composes with its stage config, every
script parses, and the scripts run end to end at a tiny scale on CPU (tiny random teacher, local text)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lit_xdistill.cli import XDistillCLI

REPO = Path(__file__).resolve().parents[2]
RUNS, CONFIGS = REPO / "runs" / "smollm2", REPO / "configs" / "smollm2"
SCRIPTS = sorted(RUNS.glob("*.sh"))
MIXER_ARMS = sorted((CONFIGS / "ablations").glob("mixer-*.yaml"))
LOSS_ARMS = sorted((CONFIGS / "ablations").glob("loss-*.yaml"))
COMPOSITIONS = (
    [("align", []), ("kd", [])]
    + [(stage, ["ablations/small.yaml", arm.relative_to(CONFIGS)]) for stage in ("align", "kd") for arm in MIXER_ARMS]
    + [("kd", ["ablations/small.yaml", arm.relative_to(CONFIGS)]) for arm in LOSS_ARMS]
)


def chain(stage: str, extra: list) -> list[str]:
    files = [REPO / "configs" / f"{stage}.yaml", CONFIGS / "data.yaml", CONFIGS / f"{stage}.yaml"]
    files += [CONFIGS / e for e in extra]
    return [a for f in files for a in ("--config", str(f))]


@pytest.mark.parametrize("stage, extra", COMPOSITIONS, ids=lambda x: x if isinstance(x, str) else "+".join(map(str, x)))
def test_config_composes(stage, extra, capsys):
    with pytest.raises(SystemExit) as done:
        XDistillCLI(args=["fit", *chain(stage, extra), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    data, model = printed["data"], printed["model"]["init_args"]
    assert data["sources"] == ["builtin:python-stdlib", "builtin:shakespeare", "builtin:gcide", "builtin:bible-kjv"]
    # one pass over a fixed subset: the logit cache then holds exactly the trained blocks
    assert data["max_train_tokens"] == printed["trainer"]["max_steps"] * data["batch_size"] * data["seq_len"]
    checkpoint = printed["trainer"]["callbacks"][0]["init_args"]
    assert checkpoint["dirpath"] == f"ckpt/{stage}" and checkpoint["save_last"]
    for arm in extra:  # the arm's settings survive the composition
        want = yaml.safe_load((CONFIGS / arm).read_text()).get("model", {}).get("init_args", {})
        for key, value in want.items():
            got = model[key]
            assert ({k: got[k] for k in value} if isinstance(value, dict) else got) == value


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama teacher (real SmolLM2 tokenizer), local text, an overlay and a 3-task suite."""
    import transformers as tf

    from lit_xdistill.teachers import TeacherSpec

    root = tmp_path_factory.mktemp("recipe")
    tok = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    words = "the cat sat on a mat while dogs ran over hills and rivers under bright stars".split()
    for i in range(300):  # enough documents for the 2% held-out split to hold some
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(30 + 5 * (i % 9)))
        (root / "text").mkdir(exist_ok=True)
        (root / "text" / f"doc{i:03d}.txt").write_text(text)
        (root / "licences").mkdir(exist_ok=True)
        (root / "licences" / f"lic{i:02d}").write_text(f"Permission is granted, condition {i}. " * 20)
    overlay = {
        "trainer": {"accelerator": "cpu", "precision": "32-true", "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"init_args": {"teacher": {"dtype": "float32"}, "student": {"window": 16}}},
        "data": {"sources": [str(root / "text")], "num_workers": 0, "val_blocks": 2},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    suite = {"name": "tiny", "limit": 2, "tasks": [{"task": "arc_easy", "shots": 0, "metric": "acc"},
                                                   {"task": "piqa", "shots": 0, "metric": "acc_norm"},
                                                   {"task": "winogrande", "shots": 0, "metric": "acc"}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root


def run_script(name: str, env: dict, check_rc: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(RUNS / name)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == check_rc, f"{name} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_recipe_end_to_end_tiny(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OUT": str(out), "TEACHER": str(tiny / "teacher"), "STEPS": "4", "SEQ_LEN": "32", "BATCH": "2",
           "EXTRA_CONFIGS": str(tiny / "tiny.yaml"), "TOPK": "8", "CACHE_BATCH": "2",
           "EVAL_SUITE": str(tiny / "suite.yaml"), "EVAL_LIMIT": "2", "EVAL_BATCH": "4",
           "UNTRAINED": str(tiny / "licences"), "PPL_BLOCKS": "2"}
    run_script("00_cache_logits.sh", env)
    for split in ("train", "val"):
        manifest = json.loads((out / "logits" / split / "manifest.json").read_text())
        assert manifest["k"] == 8 and manifest["seq_len"] == 32
    assert json.loads((out / "logits" / "train" / "manifest.json").read_text())["num_blocks"] == 4 * 2

    run_script("10_align.sh", env)
    assert (out / "align" / "student" / "config.json").is_file()
    assert "finished earlier" in run_script("10_align.sh", env).stdout  # a finished stage is not redone

    run_script("20_kd.sh", env)
    last = torch.load(out / "ckpt" / "kd" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert json.loads((out / "kd" / "student" / "config.json").read_text())["lineage"]["stage"] == "KDModule"

    printed = run_script("40_plots.sh", env).stdout
    summary = json.loads(printed[printed.index("{"):])
    assert summary["kd"]["max_steps"] == 4 and summary["kd"]["tokens"] == 4 * 2 * 32
    assert {"val/ce", "val/kl"} <= set(summary["kd"]["last"])
    assert (out / "plots" / "kd_train_loss.png").is_file() and (out / "plots" / "align_align_mse.png").is_file()
    assert (out / "plots" / "curves.png").is_file()  # the overview: both stages' objectives

    # a part of the suite stops before the merge (here while other tasks are still missing)
    part = run_script("30_eval.sh", {**env, "EVAL_TASKS": "arc_easy"}).stdout
    assert "still missing: piqa winogrande" in part and not (out / "eval" / "report.md").exists()
    # the rest as two_gpus.sh splits it: the teacher's scores in three concurrent processes (late, split, rest),
    # the student's tasks in three parts, then the merge (stages 00-20 are finished, so it goes straight to
    # them); one GPU or none serves as well. Started as on the device: detached, its log polled.
    subprocess.run(["bash", str(RUNS / "two_gpus.sh"), "start"], check=True, timeout=60,
                   env={**env, "LATE_TASKS": "piqa", "SPLIT_TASKS": "winogrande"})
    log_path, deadline = out / "two_gpus.log", time.monotonic() + 900
    while "RECIPE-" not in (log := log_path.read_text()) and time.monotonic() < deadline:
        time.sleep(2)
    lines = [line for line in log.splitlines() if "it/s" not in line]  # drop progress bars
    assert "RECIPE-DONE" in log, lines[-60:]
    assert "teacher scores: piqa / winogrande / arc_easy at once" in log
    assert all(f"teacher scores cached: {task}\n" in log for task in ("arc_easy", "piqa", "winogrande"))
    # the three student parts end without merging; the one run after them merges, once
    assert log.count("[smollm2] eval part done") == 3
    assert log.count("[smollm2] evaluation complete") == 1
    student = json.loads((out / "eval" / "student.json").read_text())
    assert {"arc_easy", "piqa", "winogrande"} <= set(student["results"])
    assert "α*" in (out / "eval" / "report.md").read_text() and (out / "eval" / "wintie.png").is_file()
    rows = json.loads((out / "eval" / "heldout_ppl.json").read_text())
    assert [r["split"] for r in rows] == ["heldout", "all"]
    assert all(r["tokens"] > 0 and 1 < r["teacher"] < 1e6 and 1 < r["student"] < 1e6 for r in rows)


    # all.sh as one device piece: every step is done, so the piece finishes at once ...
    assert "recipe complete" in run_script("all.sh", {**env, "PIECE_SECONDS": "600"}).stdout
    # ... and a piece too short for any step stops with "call again" before starting one
    assert "piece used up" in run_script("all.sh", {**env, "PIECE_SECONDS": "5"}, check_rc=75).stdout


def test_ablation_table_reports_finished_arms_and_marks_the_rest(tmp_path):
    """ablation_table.py: values of the arms that finished, "not run" for an arm cut before its evaluation or
    before any stage finished, and the figure."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ablation_table", RUNS / "ablation_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def results(scores: dict[str, float]) -> dict:
        return {"results": {t: {"alias": t, "acc,none": v, "acc_stderr,none": 0.01} for t, v in scores.items()},
                "higher_is_better": {t: {"acc": True} for t in scores}}

    def arm(name: str, ce: float | None, student: dict | None) -> None:
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        if ce is not None:
            (folder / "summary.json").write_text(json.dumps({"kd": {"last": {"val/ce": ce, "val/kl": ce / 10}}}))
        if student is not None:
            (folder / "eval" / "teacher.json").write_text(json.dumps(results({"piqa": 0.60, "boolq": 0.40})))
            (folder / "eval" / "student.json").write_text(json.dumps(results(student)))

    arm("mixer-hybrid", 2.25, {"piqa": 0.60, "boolq": 0.41})  # ties one, wins one: C_0 = 1, α* = 0
    arm("loss-0-1", 2.5, {"piqa": 0.54, "boolq": 0.38})       # loses both, by 10 % and 5 %
    arm("mixer-linear", 4.0, None)                           # trained, evaluation cut
    printed = table.main(tmp_path, None)

    rows = {line.split(" | ")[0].strip("| "): line for line in printed.splitlines()[2:]}
    assert rows["mixer-hybrid"].endswith("| 2.2500 | 0.2250 | 1.000 | 0.00 |")
    assert "| 0.000 | 0.05 |" in rows["loss-0-1"]  # C_α >= 0.5 once one of the two ties: at the 5 % loss
    assert rows["mixer-linear"].endswith("| 4.0000 | 0.4000 | not run | not run |")
    assert rows["mixer-mlstm"].endswith("| not run | not run | not run | not run |")  # no folder at all
    assert (tmp_path / "ablations.md").read_text() == printed and (tmp_path / "ablations.png").stat().st_size > 0
