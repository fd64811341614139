"""The student as a transformers model: caching, padding, generate, save/load, alignment mode."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_teachers import tiny_teacher
from transformers import AutoModelForCausalLM

import lit_xdistill  # noqa: F401  (registers the Auto classes)
from lit_xdistill.models import HybridCache, document_positions, student_from_teacher

MIXERS = ["hybrid", "mlstm", "swa", "linear", "attention"]


def _student(mixer="hybrid", family="llama"):
    # open output gate so both branches matter; float64 so equalities are tight
    return student_from_teacher(tiny_teacher(family), window=8, n_sinks=2, mixer=mixer, ogate_bias=0.0).double().eval()


@pytest.mark.parametrize("mixer", MIXERS)
def test_full_forward_equals_prefill_plus_decoding(mixer):
    student = _student(mixer)
    x = torch.randint(0, 128, (2, 30))  # crosses the window (8) and the chunk size of the reference
    with torch.no_grad():
        full = student(x).logits
        cache = HybridCache(batch_size=2)
        parts = [student(x[:, :11], cache=cache, use_cache=True).logits]
        parts += [student(x[:, i : i + 1], cache=cache, use_cache=True).logits for i in range(11, 30)]
        chunked_cache = HybridCache(batch_size=2)
        chunked = [student(x[:, a:b], cache=chunked_cache, use_cache=True).logits
                   for a, b in [(0, 5), (5, 17), (17, 30)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(chunked, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_left_padded_row_equals_row_alone(family):
    student = _student(family=family)
    x = torch.randint(1, 128, (3, 20))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    mask[2, :13] = 0
    with torch.no_grad():
        batch = student(x.masked_fill(mask == 0, 0), attention_mask=mask).logits
        for row, pad in [(0, 0), (1, 7), (2, 13)]:
            alone = student(x[row : row + 1, pad:]).logits
            torch.testing.assert_close(batch[row, pad:], alone[0], rtol=1e-10, atol=1e-10)


def test_generate_matches_uncached_greedy_and_cache_is_constant():
    student = _student()
    prompt = torch.randint(1, 128, (2, 10))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    out = student.generate(prompt, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(20):
            seg_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - 10, dtype=mask.dtype)], 1)
            nxt = student(seq, attention_mask=seg_mask).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)

    cache = HybridCache(batch_size=2)
    with torch.no_grad():
        student(prompt, cache=cache, use_cache=True)
        sizes = []
        for _ in range(12):
            student(torch.randint(1, 128, (2, 1)), cache=cache, use_cache=True)
            sizes.append(sum(t.numel() for lc in cache.layers.values()
                             for t in (lc.sink_k, lc.win_k, *lc.mlstm) if t is not None))
    assert len(set(sizes)) == 1, "cache grows with generated length"


def test_packed_documents_are_independent():
    student = _student()
    a, b = torch.randint(1, 128, (1, 9)), torch.randint(1, 128, (1, 14))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 9 + [1] * 14])
    with torch.no_grad():
        out = student(packed, segment_ids=seg, position_ids=document_positions(seg)).logits
        torch.testing.assert_close(out[:, :9], student(a).logits, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[:, 9:], student(b).logits, rtol=1e-10, atol=1e-10)


def test_save_and_load_round_trip_is_bit_exact(tmp_path):
    student = student_from_teacher(tiny_teacher("llama", tie_word_embeddings=True), window=8)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(student)
    a, b = student.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(student.eval()(x).logits, loaded.eval()(x).logits)


def test_align_mode_keeps_teacher_stream_and_reports_layer_losses():
    teacher = tiny_teacher("llama")
    student = student_from_teacher(teacher, window=4).eval()
    student.requires_grad_(False)
    for mixer in student.mixers():
        mixer.requires_grad_(True)
    x = torch.randint(0, 128, (2, 16))
    out = student(x, align=True)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, teacher(x).logits)
    assert sorted(out.align_losses) == [0, 1]
    total = sum(out.align_losses.values())
    assert total > 0
    total.backward()
    assert all(m.gates.weight.grad.abs().sum() > 0 for m in student.mixers())
    assert not out.logits.requires_grad, "the teacher stream must not carry a graph in stage I"


def test_document_positions():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_train_like_eager():
    """compile_blocks() leaves parameter names alone, traces each block whole (one graph shared by all blocks, no
    graph break) and gives the eager loss and gradients (packed documents)."""
    import copy

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = student_from_teacher(tiny_teacher("llama"), window=8, n_sinks=2, ogate_bias=0.0).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 128, (2, 40))
    seg = torch.tensor([[0] * 25 + [1] * 15, [3] * 40])
    grads = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        loss = model(x, segment_ids=seg, labels=x).loss
        loss.backward()
        grads[name] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch.testing.assert_close(grads["compiled"][0], grads["eager"][0], rtol=1e-5, atol=1e-5)
    assert grads["compiled"][1].keys() == grads["eager"][1].keys()
    for n, g in grads["eager"][1].items():
        torch.testing.assert_close(grads["compiled"][1][n], g, rtol=1e-4, atol=1e-5, msg=n)
