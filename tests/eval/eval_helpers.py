"""Fixtures for the eval tests: a tiny byte-level tokenizer and tiny random causal LMs, all offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_TEXT = [
    "Question: Which gas do plants take in? Answer: carbon dioxide, not oxygen.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat.",
    "A man is sitting on a roof. He starts pulling up roofing. Yes or no?",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained on a few sentences: encodes any text, no UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer random LlamaForCausalLM with hidden size 32."""
    from tiny_teachers import tiny_llama

    return tiny_llama(vocab_size, seed, hidden_size=32, intermediate_size=64, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=0)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """A tiny random Llama matching ``tiny_tokenizer``."""
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """One cache root for rendered tasks, shared by the tests of a session (rendering is the slow part)."""
    return tmp_path_factory.mktemp("xdistill_cache")


class TinyTeacherSpec:
    """Stands in for ``lit_xdistill.teachers.TeacherSpec``: the same members, a tiny random Llama."""

    def __init__(self, tokenizer, seed: int = 1, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer, self.seed, self.loads, self.dtype = tokenizer, seed, 0, dtype
        self.identity = f"tiny-llama-seed{seed}"

    def load_model(self):
        self.loads += 1
        return make_tiny_llama(len(self.tokenizer), self.seed)

    def load_tokenizer(self):
        return self.tokenizer

    def torch_dtype(self) -> torch.dtype:
        return self.dtype
