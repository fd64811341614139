"""Atomic artifacts: exports, logit-cache shards and checkpoints appear whole or not at all, and a
truncated shard or checkpoint is refused with the fix named."""

from __future__ import annotations

import shutil

import pytest
import torch
from reliability_helpers import REPO, build_cli, kd_overlay

from lit_xdistill.callbacks import AtomicCheckpointIO, CorruptCheckpointError
from lit_xdistill.data.logit_cache import LogitCacheError, TopKLogitCache
from lit_xdistill.modules import KDModule, StudentOptions
from lit_xdistill.teachers import TeacherSpec


def half_written(path, payload: bytes = b"PK\x03\x04 half a file") -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
    raise OSError("No space left on device (injected)")


def test_failed_export_keeps_the_previous_one(teacher_dir, tmp_path, monkeypatch):
    module = KDModule(
        teacher=TeacherSpec(str(teacher_dir), dtype="float32"), student=StudentOptions(window=16)
    )
    from lit_xdistill.models import student_from_teacher

    module.student = student_from_teacher(
        module.teacher_spec.load_model(), module.teacher_spec.identity, window=16
    )
    target = module.export(tmp_path / "student")
    before = sorted(p.name for p in target.iterdir())
    monkeypatch.setattr(
        type(module.tokenizer), "save_pretrained", lambda self, path: half_written(f"{path}/x")
    )
    with pytest.raises(OSError, match="injected"):
        module.export(tmp_path / "student")
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folder left behind


def test_failed_shard_write_leaves_no_cache(teacher_dir, text_dir, tmp_path, monkeypatch):
    from lit_xdistill.cli import cache_logits

    overlay = kd_overlay(teacher_dir, text_dir, tmp_path)
    monkeypatch.setattr("safetensors.torch.save_file", lambda tensors, path: half_written(path))
    with pytest.raises(OSError, match="injected"):
        cache_logits(
            configs=[str(REPO / "configs" / "kd.yaml"), str(overlay)],
            out_dir=str(tmp_path / "logits"),
            k=8,
            device="cpu",
        )
    assert not list((tmp_path / "logits").rglob("shard-*.safetensors"))  # only the .tmp name was written
    with pytest.raises(LogitCacheError, match="not a finished logit cache.*rerun"):
        TopKLogitCache(tmp_path / "logits" / "train")


def test_truncated_shard_is_refused(logit_cache, tmp_path):
    copy = shutil.copytree(logit_cache, tmp_path / "logits")
    shard = sorted((copy / "train").glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(LogitCacheError, match="missing or truncated.*rewrite the cache"):
        TopKLogitCache(copy / "train")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    monkeypatch.setattr(
        torch, "save", lambda obj, file: file.write(b"PK partial") and half_written(tmp_path / "x")
    )
    with pytest.raises(OSError, match="injected"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "x"]  # no .last.ckpt.tmp-* left


def test_truncated_checkpoint_is_refused_by_the_cli(teacher_dir, text_dir, tmp_path):
    overlay = kd_overlay(teacher_dir, text_dir, tmp_path, max_steps=1)
    (tmp_path / "ckpt").mkdir()
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, tmp_path / "ckpt" / "step=3.ckpt")
    data = (tmp_path / "ckpt" / "step=3.ckpt").read_bytes()
    (tmp_path / "ckpt" / "last.ckpt").write_bytes(data[: len(data) // 2])
    cli = build_cli(overlay)
    with pytest.raises(
        CorruptCheckpointError, match=r"last.ckpt is truncated.*--ckpt_path <file>.*step=3.ckpt"
    ):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
