"""A tiny random teacher folder (real SmolLM2 tokenizer) and a few local documents, shared by stage tests."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    from tiny_teachers import save_tiny_teacher

    from lit_xdistill.teachers import TeacherSpec

    tokenizer = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    return str(save_tiny_teacher(tmp_path_factory.mktemp("teacher"), tokenizer, max_position_embeddings=256,
                                 tie_word_embeddings=True))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    words = "the cat sat on a mat while dogs ran over hills and rivers under bright stars".split()
    for i in range(40):
        (path / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))))
    return str(path)
