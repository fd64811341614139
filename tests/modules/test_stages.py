"""Two-step fits of each stage through the real CLI on a tiny random teacher (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_xdistill.cli import main
from lit_xdistill.models import XDistillForCausalLM
from lit_xdistill.modules import kd_loss, topk_logprobs

ROOT = Path(__file__).resolve().parents[2]


def _fit(stage: str, tmp: Path, teacher: str, text: str, *extra: str) -> None:
    main([
        "fit", "--config", str(ROOT / "configs" / f"{stage}.yaml"),
        "--model.init_args.teacher.name", teacher, "--model.init_args.teacher.dtype", "float32",
        "--data.tokenizer", teacher, "--data.sources", f"[{text}]", "--data.seq_len", "64",
        "--data.batch_size", "2", "--data.cache_dir", str(tmp / "cache"),
        "--trainer.max_steps", "2", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
        "--trainer.logger.init_args.save_dir", str(tmp / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.val_check_interval", "1",
        "--trainer.callbacks", "[]",
        "--trainer.default_root_dir", str(tmp),
        "--model.init_args.student.window", "16",
        "--model.init_args.export_dir", str(tmp / f"{stage}_student"),
        *extra,
    ])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_teacher_dir, text_dir):
    tmp = tmp_path_factory.mktemp("align")
    _fit("align", tmp, tiny_teacher_dir, text_dir, "--model.init_args.warmup_steps", "1")
    return tmp


def test_alignment_trains_only_the_mixers(aligned, tiny_teacher_dir):
    from lit_xdistill.models import student_from_teacher
    from lit_xdistill.teachers import TeacherSpec

    spec = TeacherSpec(tiny_teacher_dir, dtype="float32")
    fresh = student_from_teacher(spec.load_model(), spec.identity, window=16).state_dict()
    trained = _weights(aligned / "align_student")
    changed = {k for k, v in trained.items() if not torch.equal(v, fresh[k])}
    assert changed, "alignment changed nothing"
    assert all(".xdistill_mixer." in k for k in changed), f"non-mixer weights changed: {sorted(changed)[:3]}"
    events = list((aligned / "runs" / "align").rglob("events.out.tfevents*"))
    assert events, "no TensorBoard log written"
    assert list((aligned / "runs" / "align").rglob("config.yaml")), "resolved config not saved with the run"


def test_kd_starts_from_stage_one_and_trains_everything(aligned, tiny_teacher_dir, text_dir, tmp_path):
    _fit("kd", tmp_path, tiny_teacher_dir, text_dir, "--model.init_args.student.init_from",
         str(aligned / "align_student"), "--model.init_args.top_k", "16", "--model.init_args.lr", "1e-3",
         "--model.init_args.warmup_steps", "1")
    before, after = _weights(aligned / "align_student"), _weights(tmp_path / "kd_student")
    assert not torch.equal(before["backbone.model.layers.0.mlp.up_proj.weight"],
                           after["backbone.model.layers.0.mlp.up_proj.weight"]), "KD must train the MLPs too"
    student = XDistillForCausalLM.from_pretrained(tmp_path / "kd_student")
    assert student.config.teacher_identity.endswith(str(Path(tiny_teacher_dir).resolve()))
    x = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(student(x).logits).all()


def test_kd_refuses_a_stage_one_result_of_another_teacher(aligned, text_dir, tmp_path, tiny_teacher_dir):
    import shutil

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_teacher_dir, other)
    with pytest.raises(ValueError, match="was distilled from teacher .* but this run's teacher is"):
        _fit("kd", tmp_path, str(other), text_dir, "--model.init_args.student.init_from",
             str(aligned / "align_student"))


def test_kd_loss_matches_its_definition():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50, dtype=torch.float64)
    teacher = torch.randn(2, 5, 50, dtype=torch.float64).log_softmax(-1)
    labels = torch.randint(0, 50, (2, 5))
    labels[0, -1] = -100
    ids = teacher.topk(8, -1).indices
    out = kd_loss(logits, labels, ids, teacher.gather(-1, ids), ce_weight=0.9, kl_weight=0.1, chunk_rows=3)
    logq = logits.log_softmax(-1)
    keep = labels >= 0
    ce = -logq.gather(-1, labels.clamp_min(0)[..., None])[..., 0][keep].mean()
    p, lq = teacher.gather(-1, ids).exp(), logq.gather(-1, ids)
    pt, qt = 1 - p.sum(-1), 1 - lq.exp().sum(-1)
    kl = ((p * (p.log() - lq)).sum(-1) + pt * (pt.log() - qt.log()))[keep].mean()
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.loss, 0.9 * ce + 0.1 * kl)
    assert int(out.tokens) == 9


def test_teacher_topk_is_log_softmax_topk_in_slices_of_bounded_bytes():
    # (B, S, V) and (N, V) alike; a slice budget of 3 rows' fp32 logits forces several slices and a ragged last
    logits = torch.randn(2, 7, 50, dtype=torch.bfloat16) * 4
    ids, lps = topk_logprobs(logits, 5, chunk_bytes=3 * 50 * 4)
    ref_lps, ref_ids = logits.float().log_softmax(-1).topk(5, dim=-1)
    assert ids.shape == lps.shape == (2, 7, 5) and ids.dtype == torch.int32 and lps.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(lps, ref_lps, atol=1e-5, rtol=1e-5)
    flat_ids, flat_lps = topk_logprobs(logits.flatten(0, 1), 5)
    assert torch.equal(flat_ids, ids.flatten(0, 1)) and torch.equal(flat_lps, lps.flatten(0, 1))


def test_kd_loss_ignored_positions_contribute_nothing():
    """Rows labelled -100 are weighted out, not selected out: even non-finite logits there change nothing,
    and a batch with no supervised position gives a zero loss with zero (finite) gradients."""
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 30, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 4, 30, dtype=torch.float64).log_softmax(-1)
    ids = teacher.topk(5, -1).indices
    labels = torch.tensor([[3, -100, 7, -100]])
    poisoned = logits.detach().clone()
    poisoned[0, 1] = float("inf")
    ref = kd_loss(logits[:, ::2], labels[:, ::2], ids[:, ::2], teacher.gather(-1, ids)[:, ::2])
    out = kd_loss(poisoned, labels, ids, teacher.gather(-1, ids))
    torch.testing.assert_close(out.loss, ref.loss.detach())
    none = kd_loss(logits, torch.full((1, 4), -100), ids, teacher.gather(-1, ids))
    none.loss.backward()
    assert none.loss.item() == 0 and int(none.tokens) == 0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_compile_blocks_auto_compiles_on_cuda_outside_fsdp(tiny_teacher_dir):
    """``auto``: compiled where it was measured to pay (one CUDA device, DDP), eager on CPU, without a trainer
    and under FSDP; true/false force it."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    from lit_xdistill.modules import KDModule, StudentOptions

    def resolved(choice, strategy):
        module = KDModule(teacher=tiny_teacher_dir, student=StudentOptions(compile_blocks=choice))
        module._trainer = SimpleNamespace(strategy=strategy) if strategy is not None else None
        return module._compiles_blocks()

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolved("auto", SingleDeviceStrategy(device=cuda))
    assert resolved("auto", DDPStrategy(parallel_devices=[cuda]))
    assert not resolved("auto", SingleDeviceStrategy(device=cpu))
    assert not resolved("auto", FSDPStrategy(parallel_devices=[cuda]))
    assert not resolved("auto", None)
    assert resolved(True, SingleDeviceStrategy(device=cpu))
    assert not resolved(False, SingleDeviceStrategy(device=cuda))


@pytest.mark.skipif(__import__("shutil").which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_alignment_with_compiled_blocks_trains_only_the_mixers(tiny_teacher_dir, text_dir, tmp_path):
    """Stage I through Lightning with every block compiled (what ``auto`` does on a GPU): the per-layer
    alignment losses come out of the compiled blocks, and still only the mixers change."""
    from lit_xdistill.models import student_from_teacher
    from lit_xdistill.teachers import TeacherSpec

    _fit("align", tmp_path, tiny_teacher_dir, text_dir, "--model.init_args.warmup_steps", "1",
         "--model.init_args.student.compile_blocks", "true")
    spec = TeacherSpec(tiny_teacher_dir, dtype="float32")
    fresh = student_from_teacher(spec.load_model(), spec.identity, window=16).state_dict()
    trained = _weights(tmp_path / "align_student")
    changed = {k for k, v in trained.items() if not torch.equal(v, fresh[k])}
    assert changed and all(".xdistill_mixer." in k for k in changed), sorted(changed)[:3]
