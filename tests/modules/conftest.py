"""A tiny random teacher folder (real SmolLM2 tokenizer) and a few local documents, shared by stage tests."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    import transformers as tf

    from lit_xdistill.teachers import TeacherSpec

    tok = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("teacher")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers under bright stars".split()
    for i in range(40):
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))))
    return str(path)
