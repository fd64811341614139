"""Tokenisation and packing: EOS between documents, chat templates, batch contract, teacher equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lit_xdistill.data.corpora import Document
from lit_xdistill.data.packing import (
    IGNORE_INDEX,
    PackedBlocks,
    TokenStreamWriter,
    encode_documents,
    token_dtype,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    return AutoTokenizer.from_pretrained(teacher_dir)


def pack(tmp_path, documents: list[list[int]], seq_len: int) -> PackedBlocks:
    writer = TokenStreamWriter(tmp_path, "train", np.dtype(np.uint16))
    for ids in documents:
        writer.add(ids)
    stats = writer.close()
    return PackedBlocks(
        tmp_path, "train", seq_len, np.dtype(np.uint16), np.arange(stats["tokens"] // seq_len)
    )


def test_every_document_ends_with_one_eos_and_chats_use_the_template(tokenizer):
    eos = tokenizer.eos_token_id
    documents = [
        Document(text="To be, or not to be"),
        Document(text="x<|im_end|>"),
        Document(messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"})),
    ]
    encoded = [ids for _, ids in encode_documents(tokenizer, documents, batch_size=2)]
    assert [ids.count(eos) for ids in encoded] == [1, 1, 3]  # the chat: two turns + the separator
    assert all(ids[-1] == eos for ids in encoded)
    assert tokenizer.decode(encoded[0]) == "To be, or not to be<|im_end|>"
    assert tokenizer.decode(encoded[2]).startswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHo"
    )


def test_blocks_follow_the_batch_contract(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [1, 5, 17, 3, 40, 2, 9, 31, 1, 12]  # documents shorter and longer than a block
    documents = [list(rng.integers(3, 300, n)) for n in lengths]
    stream = np.concatenate(documents)
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    blocks = pack(tmp_path, documents, seq_len=16)
    assert len(blocks) == sum(lengths) // 16
    for b in range(len(blocks)):
        item = blocks[b]
        assert item["input_ids"].dtype == torch.long and item["segment_ids"].dtype == torch.int32
        ids, seg, pos, labels = (
            item[k].numpy() for k in ("input_ids", "segment_ids", "position_ids", "labels")
        )
        span = slice(16 * b, 16 * b + 16)
        np.testing.assert_array_equal(ids, stream[span])
        docs = doc_of[span]
        np.testing.assert_array_equal(seg, docs - docs[0])  # consecutive within the block
        starts = np.r_[True, docs[1:] != docs[:-1]]
        np.testing.assert_array_equal(pos == 0, starts)  # position 0 exactly at segment starts
        np.testing.assert_array_equal(pos[~starts], pos[np.flatnonzero(~starts) - 1] + 1)
        for t in range(16):
            g = 16 * b + t
            same = g + 1 < len(stream) and doc_of[g + 1] == doc_of[g]
            assert labels[t] == (stream[g + 1] if same else IGNORE_INDEX)


def test_stream_end_label_is_ignored(tmp_path):
    blocks = pack(tmp_path, [[5, 6, 7, 8]], seq_len=4)
    assert blocks[0]["labels"].tolist() == [6, 7, 8, IGNORE_INDEX]


def test_packed_teacher_logits_equal_per_document_logits(tmp_path, teacher):
    """With these segment/position ids, a document-aware teacher on a packed block sees each document
    exactly as if it ran alone (the property the logit cache and the student rely on)."""
    rng = np.random.default_rng(1)
    documents = [list(rng.integers(3, 300, n)) for n in (7, 11, 14)]
    item = pack(tmp_path, documents, seq_len=32)[0]
    with torch.no_grad():
        packed = teacher(**{k: item[k][None] for k in ("input_ids", "position_ids", "segment_ids")}).logits[0]
        start = 0
        for ids in documents:
            n = min(len(ids), 32 - start)
            alone = teacher.model(input_ids=torch.tensor([ids[:n]])).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_tokenizer_fingerprint_sees_vocab_and_template(tokenizer, teacher_dir):
    other = AutoTokenizer.from_pretrained(teacher_dir)
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)
    other.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_token_dtype_fits_vocab():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(262144) == np.uint32
