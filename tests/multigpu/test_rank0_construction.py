"""Rank-0-only model construction under FSDP (``sync_module_states``): ranks other than 0 build the student
from its config alone, with uninitialised weights, and FSDP's broadcast of rank 0's parameters and buffers (in
module order) must then give every rank rank 0's exact model. FSDP's broadcast itself needs GPUs; here it is
replayed the way FSDP does it (parameters + buffers copied pairwise in module order)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from tiny_teachers import tiny_teacher

from lit_xdistill.models import XDistillForCausalLM, student_from_teacher
from lit_xdistill.modules import KDModule
from lit_xdistill.modules.base import StudentOptions, empty_student, load_student
from lit_xdistill.teachers import TeacherSpec


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple, torch.dtype]]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors]


def _replay_fsdp_sync(rank0: torch.nn.Module, empty: torch.nn.Module) -> torch.nn.Module:
    """What FSDP does with sync_module_states: broadcast rank 0's states over the other ranks' in module order."""
    ours = list(empty.parameters()) + list(empty.buffers())
    theirs = list(rank0.parameters()) + list(rank0.buffers())
    with torch.no_grad():
        for mine, source in zip(ours, theirs, strict=True):
            mine.copy_(source)
    return empty


@pytest.mark.parametrize("family, mixer, tied", [("llama", "hybrid", True), ("gemma3_text", "hybrid", True),
                                                 ("qwen3", "swa", False)])
def test_empty_student_equals_rank_zero_after_the_broadcast(tmp_path, family, mixer, tied):
    teacher = tiny_teacher(family, tie_word_embeddings=tied)
    teacher.save_pretrained(tmp_path / "teacher")
    spec = TeacherSpec(str(tmp_path / "teacher"), dtype="float32")
    options = StudentOptions(mixer=mixer, window=8)
    rank0 = student_from_teacher(spec.load_model(), spec.identity, **options.mixer_options()).float().eval()

    empty = empty_student(None, spec, options)
    assert _layout(empty) == _layout(rank0)  # same tree, names, shapes, dtypes: the broadcast pairs up
    tied = rank0.get_output_embeddings().weight is rank0.get_input_embeddings().weight
    assert (empty.get_output_embeddings().weight is empty.get_input_embeddings().weight) == tied

    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    restored = _replay_fsdp_sync(rank0, empty).eval()
    torch.testing.assert_close(restored(input_ids=ids).logits, rank0(input_ids=ids).logits, rtol=0, atol=0)

    # a stage-I export: config from the folder, the same layout as the loaded student
    rank0.save_pretrained(tmp_path / "stage1")
    loaded = load_student(str(tmp_path / "stage1"), spec, options)
    assert _layout(empty_student(str(tmp_path / "stage1"), spec, options)) == _layout(loaded)


def test_only_rank_zero_reads_the_teacher(tmp_path, monkeypatch):
    tiny_teacher("llama").save_pretrained(tmp_path / "teacher")
    spec = TeacherSpec(str(tmp_path / "teacher"), dtype="float32")

    def built_on(rank: int, sync: bool) -> XDistillForCausalLM:
        module = KDModule(teacher=spec, student=StudentOptions(window=8))
        strategy = FSDPStrategy(sync_module_states=sync)
        module._trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=strategy)
        module.configure_model()
        return module.student

    reference = built_on(0, sync=True)
    same = built_on(1, sync=False)  # no broadcast: every rank loads the teacher
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(same.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)

    def refuse(*args, **kwargs):
        raise AssertionError("a rank other than 0 read the teacher's weights")

    monkeypatch.setattr(TeacherSpec, "load_model", refuse)
    student = built_on(1, sync=True)  # built from the config alone (load_model would raise)
    assert _layout(student) == _layout(reference)
    assert [p.requires_grad for p in student.parameters()] == [p.requires_grad for p in reference.parameters()]


def test_live_teacher_under_fsdp_is_built_on_rank_zero_and_sharded(tmp_path, monkeypatch):
    """The live KD teacher follows the same rule (rank 0 reads it, the others build it empty in rank 0's
    dtype) and is handed to the FSDP wrap; the wrap itself (torch FSDP, GPUs only) is replaced by a probe."""
    import lit_xdistill.modules.kd as kd

    tiny_teacher("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "teacher")
    spec = TeacherSpec(str(tmp_path / "teacher"), dtype="bfloat16")
    wrapped = []
    monkeypatch.setattr(kd, "_shard_teacher", lambda teacher, strategy: wrapped.append(strategy) or teacher)

    def live_on(rank: int) -> torch.nn.Module:
        module = KDModule(teacher=spec, student=StudentOptions(window=8))
        strategy = FSDPStrategy(sync_module_states=True)
        module._trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=strategy)
        return module.live_teacher()

    reference = live_on(0)
    monkeypatch.setattr(TeacherSpec, "load_model", lambda *a, **k: pytest.fail("rank 1 read the teacher"))
    empty = live_on(1)
    assert _layout(empty) == _layout(reference) and reference.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in empty.parameters())
    assert len(wrapped) == 2 and all(isinstance(s, FSDPStrategy) for s in wrapped)
    restored = _replay_fsdp_sync(reference, empty)
    ids = torch.randint(0, 128, (1, 12))
    torch.testing.assert_close(restored(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
