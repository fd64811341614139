"""Shared fixtures of the reliability tests: a tiny random Llama teacher with the real SmolLM2 tokenizer,
a folder of small text documents, and a helper that runs ``lit-xdistill fit`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
SEQ_LEN = 32

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five, as expected from simple arithmetic",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings.",
    "A dictionary defines a word by other words; the circle closes only because readers know some already.",
    "Rivers carry sediment to the sea, where it settles in layers that later become rock under pressure.",
    "In the beginning the workshop was quiet; then the engines started and the whole street could hear them.",
]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny random ``LlamaForCausalLM`` (2 layers, hidden 64) saved with the real SmolLM2 tokenizer."""
    from tiny_teachers import save_tiny_teacher

    from lit_xdistill.teachers import TeacherSpec

    tokenizer = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"), tokenizer, max_position_embeddings=256,
                             tie_word_embeddings=True)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """40 small .txt documents (one document per file), enough for ~20 training blocks of 32 tokens."""
    folder = tmp_path_factory.mktemp("text")
    for i in range(40):
        body = " ".join(PARAGRAPHS[(i + j) % len(PARAGRAPHS)] for j in range(1 + i % 3))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. {body}\n")
    return folder


def kd_overlay(
    teacher_dir: Path,
    text_dir: Path,
    root: Path,
    max_steps: int = 8,
    every_n_steps: int = 1,
    callbacks: list[dict] | None = None,
    logit_cache: Path | None = None,
) -> Path:
    """Write ``root/tiny.yaml``: a config to put after ``configs/kd.yaml`` for a tiny CPU KD run.

    All outputs (logs, checkpoints, token cache) land under ``root``. ``trainer.callbacks`` replaces the
    list of kd.yaml (YAML lists replace across ``--config`` files), so the ModelCheckpoint (every step,
    ``save_last``) is repeated here, followed by ``callbacks``. Checkpoints go through
    ``AtomicCheckpointIO``; TensorBoard events are written at every step (``max_queue: 1``) so that a
    SIGKILL loses none.
    """
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(root / "ckpt"),
            "every_n_train_steps": every_n_steps,
            "save_last": True,
            "save_top_k": 1,
            "filename": "{step}",
        },
    }
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "val_check_interval": 1000,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "kd", "max_queue": 1, "flush_secs": 1},
            },
            "plugins": [{"class_path": "lit_xdistill.callbacks.AtomicCheckpointIO"}],
            "callbacks": [checkpoint, *(callbacks or [])],
        },
        "model": {
            "init_args": {
                "teacher": {"name": str(teacher_dir), "dtype": "float32"},
                "student": {"init_from": None, "window": 16},
                "lr": 1e-3,
                "warmup_steps": 2,
                "top_k": 8,
                "export_dir": None,
            }
        },
        "data": {
            "tokenizer": str(teacher_dir),
            "sources": [str(text_dir)],
            "seq_len": SEQ_LEN,
            "batch_size": 2,
            "cache_dir": str(root / "cache"),
            "logit_cache": None if logit_cache is None else str(logit_cache),
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kd_args(overlay: Path, *extra: str) -> list[str]:
    """``--config configs/kd.yaml --config <overlay>`` plus extra CLI arguments."""
    return ["--config", str(REPO / "configs" / "kd.yaml"), "--config", str(overlay), *extra]


@pytest.fixture(scope="session")
def logit_cache(teacher_dir, text_dir, tmp_path_factory) -> Path:
    """The teacher's top-8 logit cache of the tiny KD data (``lit-xdistill cache_logits``, in process)."""
    from lit_xdistill.cli import cache_logits

    root = tmp_path_factory.mktemp("logit_cache")
    overlay = kd_overlay(teacher_dir, text_dir, root)
    cache_logits(
        configs=[str(REPO / "configs" / "kd.yaml"), str(overlay)],
        out_dir=str(root / "logits"),
        k=8,
        device="cpu",
    )
    return root / "logits"


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: offline, CPU threads capped, this folder importable."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{HERE}:{REPO}",
        **extra,
    }


def launch_fit(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """Start ``lit-xdistill fit`` (with the given args) as a subprocess; stdout+stderr go to cwd/log.txt."""
    log = (cwd / "log.txt").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "lit_xdistill.cli", "fit", *args],
        cwd=cwd,
        env=cli_env(**env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def build_cli(overlay: Path, *extra: str):
    """``XDistillCLI`` for ``configs/kd.yaml`` + ``overlay`` (+ extra args), not run (``run=False``)."""
    from lit_xdistill.cli import XDistillCLI

    return XDistillCLI(args=kd_args(overlay, *extra), run=False)
