"""Teacher -> student conversion for every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import FAMILY_NAMES, tiny_teacher

from lit_xdistill.models import XDistillConfig, student_from_teacher
from lit_xdistill.teachers import UnsupportedTeacherError


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_conversion_copies_teacher_and_trains(family):
    teacher = tiny_teacher(family)
    student = student_from_teacher(teacher, window=8)
    t_sd, s_sd = teacher.state_dict(), student.backbone.state_dict()
    for name, tensor in t_sd.items():
        assert torch.equal(tensor, s_sd[name]), f"{name} not copied bit for bit"

    # new parameters per layer: two feature maps (NH, D, D/2) and the gate projection (hidden -> 3 NH)
    cfg = teacher.config
    nh = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    per_layer = 2 * nh * d * (d // 2) + (cfg.hidden_size + 1) * 3 * nh
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student - n_teacher == cfg.num_hidden_layers * per_layer

    x = torch.randint(0, cfg.vocab_size, (2, 21))
    out = student(x, labels=x)
    assert out.logits.shape == (2, 21, cfg.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    mixer = student.mixers()[0]
    for p in (mixer.gates.weight, mixer.phi_q.weight, mixer.phi_k.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_mixer_reproduces_teacher_exactly(family):
    """With every layer kept as softmax attention the student IS the teacher (incl. teacher windows)."""
    teacher = tiny_teacher(family)
    student = student_from_teacher(teacher, mixer="attention").eval()
    x = torch.randint(0, teacher.config.vocab_size, (2, 24))  # longer than the tiny teachers' window 8
    with torch.no_grad():
        assert torch.equal(teacher(x).logits, student(x).logits)


def test_untrained_student_starts_at_the_sliding_window_branch():
    """Output-gate bias -4: below the window, the student differs from the teacher only by o * (mLSTM - SWA)."""
    teacher = tiny_teacher("llama")
    x = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        ref = teacher(x).logits
        start = (student_from_teacher(teacher, window=64).eval()(x).logits - ref).abs().max()
        open_gate = (student_from_teacher(teacher, window=64, ogate_bias=0.0).eval()(x).logits - ref).abs().max()
    assert start < 0.1 * open_gate


def test_unsupported_family_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedTeacherError, match=r"'gpt2' is not supported\. Supported: .*llama.*FamilyAdapter"):
        student_from_teacher(teacher)


def test_softcapped_attention_is_refused():
    teacher = tiny_teacher("gemma3_text", attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedTeacherError, match="soft-capping"):
        student_from_teacher(teacher)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mixer": "mamba"}, "unknown mixer kind"),
        ({"mixer": ["hybrid"]}, "lists 1 kinds but the teacher has 2 layers"),
        ({"feature_map": "relu"}, "unknown feature_map"),
        ({"window": 0}, "window must be >= 1"),
    ],
)
def test_bad_mixer_settings_are_rejected(kwargs, message):
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match=message):
        student_from_teacher(teacher, **kwargs)


def test_per_layer_mixers():
    teacher = tiny_teacher("llama")
    student = student_from_teacher(teacher, mixer=["attention", "hybrid"])
    assert [m.kind for m in student.mixers()] == ["attention", "hybrid"]
    assert isinstance(student.config, XDistillConfig)


def test_bf16_teacher_from_pretrained_is_reproduced_exactly(tmp_path):
    """RoPE's inv_freq is a non-persistent buffer: it must keep the teacher's dtype (fp32), not be rounded."""
    from transformers import AutoModelForCausalLM

    tiny_teacher("llama", rope_theta=5e5).save_pretrained(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    student = student_from_teacher(teacher, mixer="attention")
    assert student.backbone.model.rotary_emb.inv_freq.dtype == teacher.model.rotary_emb.inv_freq.dtype
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert torch.equal(teacher(x).logits, student(x).logits)
