"""``write_topk_cache`` data parallel, run for real on CPU with 2 gloo ranks (a tiny Llama with the SmolLM2
tokenizer over a few documents: 9 blocks of 32 tokens in 5 shards of 2, 2, 2, 2 and 1 blocks, so rank 0
computes shards 0, 2 and 4 and rank 1 shards 1 and 3).

Each case is checked against a single-process cache of the same data written in this process: the 2-rank
cache holds the same files with the same bytes (manifest included), a write interrupted in one process is
finished by 2 ranks, and a rank that fails makes both ranks fail, leaving a partial folder that one process
then finishes. Every process computes on one thread, so that the float results do not depend on the
threading.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch
from multigpu_helpers import init_gloo, spawn_ranks

from lit_xdistill.data import DistillDataModule, LogitCacheError, write_topk_cache

WORLD = 2
BLOCKS = 9
ARGS = {"k": 8, "batch_size": 2, "teacher_identity": "tiny-smol", "blocks_per_shard": 2}  # a forward per shard
SHARDS = [f"shard-{i:05d}.safetensors" for i in range(5)]
DEADLINE_S = 120  # the whole 2-rank run; a collective that only one rank joins times out after 60 s


class Teacher(torch.nn.Module):
    """The tiny Llama keeping documents apart (block-diagonal causal mask from ``segment_ids``, as in
    tests/data/conftest.py); counts its forward calls and raises at call ``fail_at`` (a crash)."""

    def __init__(self, teacher_dir: str, fail_at: int = 0) -> None:
        from transformers import LlamaForCausalLM

        super().__init__()
        self.model = LlamaForCausalLM.from_pretrained(teacher_dir, attn_implementation="sdpa").eval()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        S = input_ids.shape[1]
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool, device=input_ids.device))
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask[:, None])


def _datamodule(teacher_dir: str, docs_dir: str, cache_dir: Path) -> DistillDataModule:
    return DistillDataModule(teacher_dir, [docs_dir], seq_len=32, batch_size=2, max_train_tokens=32 * BLOCKS,
                             val_blocks=1, cache_dir=str(cache_dir))


def _rank(rank: int, world: int, port: int, teacher_dir: str, docs_dir: str, out: str) -> None:
    """One rank: tokenise (its own token cache folder, built by rank 0), then three writes by both ranks:
    ``fresh`` (from nothing), ``resumed`` (whose partial folder this test's process left) and ``crashed``
    (rank 1's teacher fails on its second shard). Records the returned paths, the forward calls and errors."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    init_gloo(rank, world, port)
    record: dict = {}
    try:
        dm = _datamodule(teacher_dir, docs_dir, Path(out) / "tokens")
        teacher = Teacher(teacher_dir)
        for case in ("fresh", "resumed"):
            teacher.calls = 0
            record[case] = {"path": str(write_topk_cache(teacher, dm, f"{out}/{case}/train", **ARGS)),
                            "calls": teacher.calls}
        teacher.calls, teacher.fail_at = 0, 2 if rank == 1 else 0
        try:
            write_topk_cache(teacher, dm, f"{out}/crashed/train", **ARGS)
            record["crashed"] = {"error": None}
        except Exception as exc:  # noqa: BLE001 - the case under test
            record["crashed"] = {"error": f"{type(exc).__name__}: {exc}"}
        record["crashed"]["calls"] = teacher.calls
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _single_process(fn):
    """``fn()`` computing on one thread, like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(smol_teacher_dir, docs_dir, tmp_path_factory) -> Path:
    """The single-process reference cache, a single-process write interrupted after shards 0 and 1, then the
    2-rank run."""
    out = tmp_path_factory.mktemp("cache_writer")
    dm = _datamodule(str(smol_teacher_dir), str(docs_dir), out / "tokens_single")
    teacher = Teacher(str(smol_teacher_dir), fail_at=3)

    def interrupted() -> None:
        with pytest.raises(RuntimeError, match="simulated crash"):
            write_topk_cache(teacher, dm, str(out / "resumed" / "train"), **ARGS)

    _single_process(interrupted)
    partial = out / "resumed" / ".train.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["key.json", *SHARDS[:2], "vocab.json"]
    _single_process(lambda: write_topk_cache(Teacher(str(smol_teacher_dir)), dm, str(out / "reference" / "train"),
                                             **ARGS))
    spawn_ranks(_rank, (str(smol_teacher_dir), str(docs_dir), str(out)), out, WORLD, DEADLINE_S)
    return out


def _records(runs: Path) -> list[dict]:
    return [json.loads((runs / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _assert_same_cache(folder: Path, reference: Path) -> None:
    """Same files, byte for byte, and no partial folder or temporary file left."""
    names = sorted(p.name for p in reference.iterdir())
    assert names == ["manifest.json", *SHARDS]
    assert sorted(p.name for p in folder.iterdir()) == names
    for name in names:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name
    assert sorted(p.name for p in folder.parent.iterdir()) == ["train"]


def test_two_ranks_write_the_single_process_cache(runs, smol_teacher_dir):
    """Byte for byte the single-process cache; each rank computed only its shards (3 and 2 forwards) and
    both returned the final folder."""
    reference = runs / "reference" / "train"
    manifest = json.loads((reference / "manifest.json").read_text())
    assert [s["num_blocks"] for s in manifest["shards"]] == [2, 2, 2, 2, 1] and manifest["num_blocks"] == BLOCKS
    assert manifest["vocab_size"] == json.loads((smol_teacher_dir / "config.json").read_text())["vocab_size"]
    _assert_same_cache(runs / "fresh" / "train", reference)
    records = _records(runs)
    assert [r["fresh"]["path"] for r in records] == [str(runs / "fresh" / "train")] * WORLD
    assert [r["fresh"]["calls"] for r in records] == [3, 2]


def test_two_ranks_finish_a_single_process_write(runs):
    """A write interrupted in one process after shards 0 and 1 is finished by 2 ranks (rank 0 computes
    shards 2 and 4, rank 1 shard 3) into the single-process cache."""
    _assert_same_cache(runs / "resumed" / "train", runs / "reference" / "train")
    records = _records(runs)
    assert [r["resumed"]["path"] for r in records] == [str(runs / "resumed" / "train")] * WORLD
    assert [r["resumed"]["calls"] for r in records] == [2, 1]


def test_a_failing_rank_fails_both_and_one_process_finishes(runs, smol_teacher_dir, docs_dir):
    """Rank 1 crashes on shard 3: it raises its error, rank 0 (after its own shards 0, 2, 4) a LogitCacheError
    naming rank 1's; the partial folder keeps the 4 finished shards, and one process later computes only
    shard 3 (a stale temporary file there is discarded) into the single-process cache."""
    rank0, rank1 = (r["crashed"] for r in _records(runs))
    assert rank1 == {"error": "RuntimeError: simulated crash", "calls": 2}
    assert rank0["calls"] == 3 and rank0["error"].startswith(
        f"{LogitCacheError.__name__}: Writing the logit cache failed on rank 1 (RuntimeError: simulated crash)")
    partial = runs / "crashed" / ".train.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["key.json", *SHARDS[:3], SHARDS[4], "vocab.json"]
    (partial / f"{SHARDS[3]}.tmp").write_bytes(b"half a shard")

    teacher = Teacher(str(smol_teacher_dir))
    dm = _datamodule(str(smol_teacher_dir), str(docs_dir), runs / "tokens_single")
    _single_process(lambda: write_topk_cache(teacher, dm, str(runs / "crashed" / "train"), **ARGS))
    assert teacher.calls == 1
    _assert_same_cache(runs / "crashed" / "train", runs / "reference" / "train")
