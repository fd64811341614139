"""A 2-process DDP (gloo, CPU) stage-II fit through the real CLI with the WinTieCallback: both ranks
finish, only rank 0 evaluates, writes the teacher results and exports, every rank logs the same
``wintie/*`` values, and nothing deadlocks (the run is killed after a timeout)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from multigpu_helpers import HERE, REPO

TIMEOUT_S = 300


def _overlay(root: Path, teacher: Path, docs: Path) -> Path:
    """Config to put after configs/kd.yaml: tiny live-teacher KD, 2 steps, Win-and-Tie at step 2 on a
    one-task suite of 2 items, the rank probe; every output under ``root``."""
    suite = root / "suite.yaml"
    suite.write_text("name: ddp\nlimit: 2\ntasks:\n  - {task: piqa, shots: 0, metric: acc}\n")
    config = {
        "trainer": {
            "precision": "32-true",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "kd"}},
            "callbacks": [  # replaces kd.yaml's list (no checkpoints needed here)
                {"class_path": "lit_xdistill.callbacks.WinTieCallback",
                 "init_args": {"suite": str(suite), "every_n_epochs": 0, "every_n_train_steps": 2,
                               "batch_size": 2, "cache_dir": str(root / "eval_cache")}},
                {"class_path": "multigpu_helpers.RankProbe", "init_args": {"out_dir": str(root / "ranks")}},
            ],
        },
        "model": {"init_args": {
            "teacher": {"name": str(teacher), "dtype": "float32"},
            "student": {"init_from": None, "window": 16},
            "lr": 1e-3, "warmup_steps": 1, "top_k": 8,
            "export_dir": str(root / "export" / "student"),
        }},
        "data": {"tokenizer": str(teacher), "sources": [str(docs)], "seq_len": 32, "batch_size": 2,
                 "cache_dir": str(root / "token_cache")},
    }
    path = root / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_fit(root: Path, overlay: Path) -> subprocess.CompletedProcess:
    """``lit-xdistill fit`` with 2 CPU processes (Lightning launches rank 1 itself); killed on timeout."""
    cmd = [sys.executable, "-m", "lit_xdistill.cli", "fit", "--config", str(REPO / "configs" / "kd.yaml"),
           "--config", str(overlay), "--trainer.strategy", "ddp", "--trainer.devices", "2",
           "--trainer.accelerator", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: a timeout kills both ranks
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-rank DDP fit did not finish in {TIMEOUT_S}s (deadlock?):\n{out.decode()[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, smol_teacher_dir, docs_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    done = _run_fit(root, _overlay(root, smol_teacher_dir, docs_dir))
    assert done.returncode == 0, done.stdout[-4000:]
    return root


def _ranks(root: Path) -> dict[int, dict]:
    return {r["global_rank"]: r for r in (json.loads(p.read_text()) for p in (root / "ranks").glob("rank*.json"))}


def test_both_ranks_finish_in_separate_processes(ddp_run):
    ranks = _ranks(ddp_run)
    assert sorted(ranks) == [0, 1]
    assert {r["world_size"] for r in ranks.values()} == {2}
    assert ranks[0]["pid"] != ranks[1]["pid"]


def test_only_rank_zero_evaluates_and_exports(ddp_run):
    ranks = _ranks(ddp_run)
    assert ranks[0]["calls"] == {"run_suite": 2, "export": 1}  # teacher once + student once; one export
    assert ranks[1]["calls"] == {"run_suite": 0, "export": 0}
    export = ddp_run / "export"
    assert [p.name for p in export.iterdir()] == ["student"], "leftover temporary export folders"
    assert (export / "student" / "config.json").is_file()
    assert (export / "student" / "model.safetensors").is_file()
    results = list((ddp_run / "eval_cache" / "teacher_results").iterdir())
    assert len(results) == 1 and results[0].suffix == ".json", results


def test_every_rank_logs_rank_zeros_wintie_metrics(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ranks = _ranks(ddp_run)
    metrics = ranks[0]["wintie"]
    assert {"wintie/C_0", "wintie/C_0.05", "wintie/alpha_star", "wintie/score/piqa"} <= metrics.keys()
    assert 0.0 <= metrics["wintie/C_0"] <= 1.0
    assert json.dumps(ranks[1]["wintie"]) == json.dumps(metrics)  # broadcast: the same values (nan too)
    versions = list((ddp_run / "runs" / "kd").iterdir())
    assert len(versions) == 1, "only rank 0 writes TensorBoard logs"
    events = EventAccumulator(str(versions[0]), size_guidance={"scalars": 0})
    events.Reload()
    # one evaluation, after optimizer step 2; Lightning logs from on_train_batch_end at the batch's
    # 0-based step (like tests/eval/test_callback.py: epoch end after 2 steps logs at step 1)
    assert [e.step for e in events.Scalars("wintie/C_0")] == [1]
