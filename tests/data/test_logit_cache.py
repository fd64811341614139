"""Top-k logit cache: round trip against the live teacher, refusal of mismatches, corruption, resume."""

from __future__ import annotations

import json

import pytest
import torch

from lit_xdistill.data import DistillDataModule, LogitCacheError, TopKLogitCache, write_topk_cache
from lit_xdistill.data.logit_cache import _check_disk

K = 8


def make(teacher_dir, tmp_path, text_dir, **kwargs) -> DistillDataModule:
    kwargs = {
        "seq_len": 32,
        "batch_size": 4,
        "max_train_tokens": 32 * 12,
        "val_blocks": 3,
        "cache_dir": str(tmp_path / "cache"),
        **kwargs,
    }
    return DistillDataModule(str(teacher_dir), [str(text_dir)], **kwargs)


@pytest.fixture
def written(teacher, teacher_dir, tmp_path, text_dir):
    """A train cache (3 shards of 5, 5, 2 blocks) and a val cache under tmp_path/logits."""
    dm = make(teacher_dir, tmp_path, text_dir)
    for split in ("train", "val"):
        write_topk_cache(
            teacher,
            dm,
            str(tmp_path / "logits" / split),
            k=K,
            batch_size=3,
            teacher_identity="tiny-llama",
            split=split,
            blocks_per_shard=5,
        )
    return tmp_path / "logits"


def test_batches_carry_the_teachers_topk(written, teacher, teacher_dir, tmp_path, text_dir):
    dm = make(teacher_dir, tmp_path, text_dir, logit_cache=str(written), logit_cache_teacher="tiny-llama")
    dm.setup("fit")
    manifest = json.loads((written / "train" / "manifest.json").read_text())
    assert [s["num_blocks"] for s in manifest["shards"]] == [5, 5, 2] and manifest["k"] == K
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        batch = next(iter(loader))
        assert batch["topk_ids"].shape == (4 if split == "train" else 3, 32, K)
        assert batch["topk_ids"].dtype == torch.int32 and batch["topk_logprobs"].dtype == torch.float32
        with torch.no_grad():
            logits = teacher(**{k: batch[k] for k in ("input_ids", "position_ids", "segment_ids")}).logits
        expected, expected_ids = torch.log_softmax(logits.float(), -1).topk(K, dim=-1)
        torch.testing.assert_close(batch["topk_logprobs"], expected, atol=2e-3, rtol=1e-3)
        assert (batch["topk_ids"] == expected_ids).float().mean() > 0.99  # fp16 ties may swap order
        assert (batch["topk_logprobs"].exp().sum(-1) <= 1 + 1e-3).all()


def test_finished_cache_is_reused_not_recomputed(written, teacher, teacher_dir, tmp_path, text_dir):
    calls = teacher.calls
    dm = make(teacher_dir, tmp_path, text_dir)
    write_topk_cache(teacher, dm, str(written / "train"), k=K, batch_size=3, teacher_identity="tiny-llama")
    assert teacher.calls == calls
    with pytest.raises(LogitCacheError, match="another configuration"):
        write_topk_cache(teacher, dm, str(written / "train"), k=4, teacher_identity="tiny-llama")


def test_mismatches_are_refused_naming_the_field(written, teacher_dir, tmp_path, text_dir):
    cases = [
        ({"seq_len": 16}, "seq_len: cache has 32, expected 16"),
        ({"logit_cache_teacher": "other-teacher"}, "teacher: cache has 'tiny-llama'"),
        ({"max_train_tokens": 32 * 6}, "data_fingerprint"),
        ({"logit_cache": str(written / "val")}, "split: cache has 'val', expected 'train'"),
    ]
    for overrides, message in cases:
        dm = make(teacher_dir, tmp_path, text_dir, **{"logit_cache": str(written), **overrides})
        with pytest.raises(LogitCacheError, match=message):
            dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="cache_logits"):
        make(teacher_dir, tmp_path, text_dir, logit_cache=str(tmp_path)).setup("fit")


def test_truncated_and_corrupted_shards_are_detected(written):
    shard = written / "train" / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(LogitCacheError, match="missing or truncated"):
        TopKLogitCache(written / "train")
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    cache = TopKLogitCache(written / "train")
    cache.read(0)  # shard 0 is intact
    with pytest.raises(LogitCacheError, match="corrupted"):
        cache.read(7)


class FailingTeacher(torch.nn.Module):
    """Wraps a teacher and raises on its n-th call (a crash in the middle of writing a cache)."""

    def __init__(self, teacher: torch.nn.Module, fail_at: int) -> None:
        super().__init__()
        self.teacher, self.fail_at, self.calls = teacher, fail_at, 0

    def forward(self, **inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.teacher(**inputs)


def test_interrupted_write_resumes_from_the_last_finished_shard(teacher, teacher_dir, tmp_path, text_dir):
    dm = make(teacher_dir, tmp_path, text_dir)
    out = tmp_path / "logits" / "train"
    args = {"k": K, "batch_size": 5, "teacher_identity": "tiny-llama", "blocks_per_shard": 5}
    crashing = FailingTeacher(teacher, fail_at=2)  # shard 0 finished, shard 1 not
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_topk_cache(crashing, dm, str(out), **args)
    assert not out.exists()  # nothing that looks finished
    with pytest.raises(LogitCacheError, match="rerun write_topk_cache to finish it"):
        TopKLogitCache(out)
    resumed = FailingTeacher(teacher, fail_at=-1)
    write_topk_cache(resumed, dm, str(out), **args)
    assert resumed.calls == 2  # shards 1 and 2 only
    straight = tmp_path / "straight"
    write_topk_cache(teacher, dm, str(straight), **args)
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (out / name).read_bytes() == (straight / name).read_bytes()
    assert not list(out.parent.glob(".*partial"))


def test_disk_space_is_checked_before_the_teacher_runs(tmp_path):
    with pytest.raises(LogitCacheError, match="GiB free"):
        _check_disk(tmp_path, 1 << 60)
