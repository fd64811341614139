"""DistillDataModule: batches, caching, splits, determinism and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lit_xdistill.data import DistillDataModule, split_of
from lit_xdistill.data.corpora import Document


def make(teacher_dir, tmp_path, sources, **kwargs) -> DistillDataModule:
    kwargs = {"seq_len": 64, "batch_size": 4, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return DistillDataModule(str(teacher_dir), [str(s) for s in sources], **kwargs)


def block_keys(loader) -> list[bytes]:
    return [row.numpy().tobytes() for batch in loader for row in batch["input_ids"]]


def test_batches_have_the_contract_shapes_and_dtypes(teacher_dir, tmp_path, text_dir):
    dm = make(teacher_dir, tmp_path, [text_dir])
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = {
        "input_ids": torch.long,
        "segment_ids": torch.int32,
        "position_ids": torch.long,
        "labels": torch.long,
    }
    assert {k: v.dtype for k, v in batch.items()} == expected
    assert all(v.shape == (4, 64) for v in batch.values())
    assert len(dm.val_dataloader()) > 0 and len(dm.test_dataloader()) > 0
    # The chat file went through the template: its tokens appear somewhere in the training stream.
    tokens = np.fromfile(next((tmp_path / "cache").glob("tokens-*")) / "train.tokens.bin", dtype=np.uint16)
    im_start = dm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (tokens == im_start).sum() > 0


def test_tokenised_once_cached_atomically_and_keyed_by_content(teacher_dir, tmp_path, text_dir):
    dm = make(teacher_dir, tmp_path, [text_dir])
    dm.prepare_data()
    (cache,) = (tmp_path / "cache").iterdir()  # no temporary folder left behind
    mtime = (cache / "train.tokens.bin").stat().st_mtime_ns
    again = make(teacher_dir, tmp_path, [text_dir], seq_len=32, seed=5)
    again.prepare_data()  # other seq_len and seed: same token cache, not rewritten
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]
    assert (cache / "train.tokens.bin").stat().st_mtime_ns == mtime
    assert again.data_fingerprint() != dm.data_fingerprint()  # but other blocks
    (text_dir / "doc000.txt").write_text("changed text")
    changed = make(teacher_dir, tmp_path, [text_dir])
    changed.prepare_data()
    assert len(list((tmp_path / "cache").iterdir())) == 2
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 0 and meta["tokens_per_second"] > 0


def test_order_is_seeded_and_epochs_differ(teacher_dir, tmp_path, text_dir):
    def order(seed, epoch):
        dm = make(teacher_dir, tmp_path, [text_dir], seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return block_keys(loader)

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(1, 0) and first != order(0, 1)
    dm = make(teacher_dir, tmp_path, [text_dir])
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(3)
    assert sorted(sampler) == list(range(len(dm.datasets["train"])))  # an epoch visits every block once


def test_max_train_tokens_and_val_blocks_select_fixed_subsets(teacher_dir, tmp_path, text_dir):
    full = make(teacher_dir, tmp_path, [text_dir])
    full.setup("fit")
    small = make(teacher_dir, tmp_path, [text_dir], max_train_tokens=64 * 10, val_blocks=1, seed=3)
    small.setup("fit")
    assert len(small.datasets["train"]) == 10 and len(small.datasets["val"]) == 1
    other_seed = make(teacher_dir, tmp_path, [text_dir], max_train_tokens=64 * 10, val_blocks=1, seed=4)
    other_seed.setup("fit")
    np.testing.assert_array_equal(
        small.datasets["train"].block_index, other_seed.datasets["train"].block_index
    )
    assert (
        small.data_fingerprint() == other_seed.data_fingerprint()
    )  # the seed only orders: caches stay valid
    assert set(small.datasets["train"].block_index) <= set(full.datasets["train"].block_index)


def test_heldout_documents_never_reach_training(teacher_dir, tmp_path):
    documents = [f"document number {i} " * (1 + i % 5) for i in range(400)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in documents + documents[:50])
    )  # with repeats
    dm = make(teacher_dir, tmp_path, [jsonl], seq_len=16)
    dm.setup("fit")
    splits = {t: split_of(Document(text=t)) for t in documents}
    assert {"train", "val", "heldout"} == set(splits.values())
    decoded = {
        s: dm.tokenizer.decode(
            np.fromfile(next((tmp_path / "cache").glob("tokens-*")) / f"{s}.tokens.bin", dtype=np.uint16)
        )
        for s in ("train", "heldout")
    }
    for text, split in splits.items():
        assert (text + "<|im_end|>" in decoded["train"]) == (split == "train")
        assert (text + "<|im_end|>" in decoded["heldout"]) == (split == "heldout")


def test_bad_input_fails_early_with_the_fix(teacher_dir, tmp_path, text_dir):
    with pytest.raises(FileNotFoundError, match="not found: give an existing file"):
        make(teacher_dir, tmp_path, [tmp_path / "missing.txt"]).prepare_data()
    with pytest.raises(ValueError, match="Unknown built-in corpus"):
        make(teacher_dir, tmp_path, ["builtin:nope"]).prepare_data()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(ValueError, match="all 1 file\\(s\\) are empty"):
        make(teacher_dir, tmp_path, [empty]).prepare_data()
    with pytest.raises(ValueError, match="seq_len=8192 exceeds max_context=2048"):
        make(teacher_dir, tmp_path, [text_dir], seq_len=8192, max_context=2048).prepare_data()
    with pytest.raises(ValueError, match="model_max_length=4096"):
        make(teacher_dir, tmp_path, [text_dir], seq_len=8192).prepare_data()
    with pytest.raises(ValueError, match="exceeds the teacher's max_position_embeddings=2048: lower seq_len"):
        make(teacher_dir, tmp_path, [text_dir], seq_len=3000).prepare_data()
    assert not (tmp_path / "cache").exists()  # none of the above started tokenising
    (empty / "a.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="holds no documents with text"):
        make(teacher_dir, tmp_path, [empty]).prepare_data()
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    with pytest.raises(ValueError, match="fewer than one block of seq_len=64: add data or lower seq_len"):
        make(teacher_dir, tmp_path, [tiny]).setup("fit")
    few = make(teacher_dir, tmp_path, [text_dir], max_train_tokens=64 * 3)
    few.setup("fit")
    with pytest.raises(
        ValueError, match="Only 3 training block\\(s\\).*fewer than batch_size=4: lower batch_size"
    ):
        few.train_dataloader()
    with pytest.raises(ValueError, match="sources is empty"):
        make(teacher_dir, tmp_path, [])
