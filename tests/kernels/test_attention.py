"""attention(): the visibility rule, GQA, and the flex path against the dense SDPA reference."""

import shutil
import sys

import pytest
import torch
from xdistill_kernels import attention
from xdistill_kernels.attention import visibility_mask


def _rule(S, window, n_sinks, seg):
    """The visibility rule written out literally, one (i, j) at a time."""
    start = [0] * S
    for t in range(1, S):
        start[t] = t if seg[t] != seg[t - 1] else start[t - 1]
    out = torch.zeros(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(i + 1):
            same = start[i] == start[j]
            near = window is None or i - j < window or j - start[j] < n_sinks
            out[i, j] = same and near
    return out


@pytest.mark.parametrize("window,n_sinks", [(None, 0), (3, 0), (3, 2), (1, 4)])
def test_visibility_mask_matches_rule(window, n_sinks):
    seg = torch.tensor([[5, 5, 5, 5, 5, 5, 1, 2, 2, 2, 2, 2, 2, 2, 5, 5]])
    mask = visibility_mask(16, window=window, n_sinks=n_sinks, segment_ids=seg, batch=1)
    assert torch.equal(mask[0], _rule(16, window, n_sinks, seg[0].tolist()))
    assert mask[0].diagonal().all()  # no row is ever empty


def _naive(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], -torch.inf)
    return s.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_matches_naive_softmax(backend):
    """Outputs (and gradients where the backend has a CPU backward) vs softmax written out, float32
    (differences are rounding, ~1e-6). FlexAttention has no CPU backward; the GPU tests cover it."""
    g = torch.Generator().manual_seed(0)
    B, NH, NKV, S, D = 2, 4, 2, 40, 16
    grad = backend == "sdpa"
    q = torch.randn(B, NH, S, D, generator=g, requires_grad=grad)
    k = torch.randn(B, NKV, S, D, generator=g, requires_grad=grad)
    v = torch.randn(B, NKV, S, D, generator=g, requires_grad=grad)
    seg = torch.tensor([[0] * 25 + [1] * 15, [3] * 7 + [4] + [3] * 32])
    out = attention(q, k, v, window=8, n_sinks=2, segment_ids=seg, backend=backend)
    mask = visibility_mask(S, window=8, n_sinks=2, segment_ids=seg, batch=B)
    ref = _naive(q, k, v, mask, D**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if not grad:
        return
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_errors():
    q = torch.randn(1, 3, 4, 8)
    with pytest.raises(ValueError, match="NKV"):
        attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, q, q, backend="nope")


def test_flex_block_mask_follows_the_segment_ids_tensor():
    """The flex block mask is cached per segment-id tensor (no host read of the ids): a new tensor with
    other contents, and an in-place edit of a cached one, must each get their own mask."""
    g = torch.Generator().manual_seed(1)
    B, NH, S, D = 2, 2, 24, 8
    q, k, v = (torch.randn(B, NH, S, D, generator=g) for _ in range(3))

    def check(seg):
        out = attention(q, k, v, window=4, n_sinks=1, segment_ids=seg, backend="flex")
        mask = visibility_mask(S, window=4, n_sinks=1, segment_ids=seg, batch=B)
        torch.testing.assert_close(out, _naive(q, k, v, mask, D**-0.5), rtol=1e-5, atol=1e-5)

    seg = torch.tensor([[0] * 10 + [1] * 14, [2] * 24])
    check(seg)
    check(seg)  # cached
    check(torch.tensor([[0] * 3 + [1] * 21, [2] * 12 + [3] * 12]))  # another tensor, other documents
    seg[1, 5:] = 7  # in place: the version counter changes, the cached mask must not be reused
    check(seg)
    with torch.inference_mode():  # ids without a version counter: keyed by identity alone
        check(torch.tensor([[0] * 20 + [1] * 4, [2] * 24]))


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_block_mask_build_equals_eager(monkeypatch):
    """Long sequences build the flex block mask compiled (no S x S grid in memory): the same mask as eager,
    for packed documents with a window and sinks."""
    attention_module = sys.modules["xdistill_kernels.attention"]  # the package exports the function by that name
    B, S = 2, 384  # three 128-blocks
    seg = torch.tensor([[0] * 100 + [1] * 200 + [2] * 84, [5] * 384])
    dense = {}
    for compiled in (False, True):
        attention_module._BLOCK_MASKS.clear()
        monkeypatch.setattr(attention_module, "_compile_mask_build", lambda device, S, c=compiled: c)
        dense[compiled] = attention_module._block_mask(B, S, 64, 4, seg, torch.device("cpu")).to_dense()
    assert torch.equal(dense[True], dense[False])
    assert 0 < dense[True].sum() < dense[True].numel()  # some blocks skipped, some computed



def test_dense_masks_are_shared_through_the_pass_mask_cache(monkeypatch):
    """The sdpa backend builds a dense mask once per mask_cache (one forward pass) and key: the layers of a pass
    share it; other segment ids, an in-place edit, another length or another window each get their own; without
    a mask_cache every call builds its own. Every output equals softmax written out with a fresh mask."""
    attention_module = sys.modules["xdistill_kernels.attention"]
    builds = []
    real = attention_module.visibility_mask
    monkeypatch.setattr(attention_module, "visibility_mask", lambda *a, **kw: builds.append(a) or real(*a, **kw))
    g = torch.Generator().manual_seed(2)
    B, NH, NKV, D = 2, 4, 2, 8
    pass_cache: dict = {}

    def check(S, seg, window=4, cache=pass_cache):
        q = torch.randn(B, NH, S, D, generator=g)
        k, v = (torch.randn(B, NKV, S, D, generator=g) for _ in range(2))
        out = attention(q, k, v, window=window, n_sinks=1, segment_ids=seg, backend="sdpa", mask_cache=cache)
        mask = real(S, window=window, n_sinks=1, segment_ids=seg, batch=B)
        torch.testing.assert_close(out, _naive(q, k, v, mask, D**-0.5), rtol=1e-5, atol=1e-5)

    for _ in range(3):  # three layers of one pass, one document per row
        check(24, None)
    assert len(builds) == 1
    seg = torch.tensor([[0] * 10 + [1] * 14, [2] * 24])
    check(24, seg)
    check(24, seg)
    assert len(builds) == 2
    seg[1, 5:] = 7  # in place: the cached mask must not be reused
    check(24, seg)
    check(24, torch.tensor([[0] * 3 + [1] * 21, [2] * 12 + [3] * 12]))
    check(17, None)
    check(24, None, window=6)
    assert len(builds) == 6
    check(24, None, cache=None)
    check(24, None, cache=None)
    assert len(builds) == 8
    with torch.inference_mode():  # ids without a version counter (the merge stage scores under inference mode)
        seg = torch.tensor([[0] * 10 + [1] * 14, [2] * 24])
        check(24, seg)
        check(24, seg)
    assert len(builds) == 9
