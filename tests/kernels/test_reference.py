"""The three pure-torch mLSTM forms agree (outputs, final states, all gradients) in float64.

float64 makes the forms agree to ~1e-12 whenever they compute the same function, so the tolerance 1e-9
separates "same semantics" from any real difference (a wrong decay, a missed reset, a gradient through m)."""

import pytest
import torch
from mlstm_inputs import loss_and_grads, make_inputs
from xdistill_kernels import mlstm, mlstm_fresh_state, mlstm_step
from xdistill_kernels.reference import FRESH_M

TOL = dict(rtol=1e-9, atol=1e-9)


def _fn(backend, chunk_size=None):
    def fn(*args, **kw):
        return mlstm(*args, backend=backend, chunk_size=chunk_size, return_final_state=True, **kw)

    return fn


def _assert_same(a, b):
    h_a, s_a, g_a = a
    h_b, s_b, g_b = b
    torch.testing.assert_close(h_a, h_b, **TOL)
    for x, y in zip(s_a, s_b):
        torch.testing.assert_close(x, y, **TOL)
    assert len(g_a) == len(g_b)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n_docs", [0, 4])
def test_forms_agree(with_state, n_docs):
    tensors, seg, state = make_inputs(2, 2, 37, 8, 6, with_state=with_state, n_docs=n_docs)
    ref = loss_and_grads(_fn("recurrent"), tensors, seg, state)
    _assert_same(loss_and_grads(_fn("parallel"), tensors, seg, state), ref)
    for cs in (8, 16, 64):  # 37 is no multiple of any of them; 64 > S is one partial chunk
        _assert_same(loss_and_grads(_fn("chunkwise", cs), tensors, seg, state), ref)


@pytest.mark.parametrize("n_docs", [0, 3])
def test_state_carried_across_calls(n_docs):
    """call(x[:cut]) then call(x[cut:], state) == call(x): outputs, final states and all gradients.

    The second call's first position continues the state, so with documents the cut is placed inside one."""
    tensors, seg, state = make_inputs(2, 3, 41, 8, 8, with_state=True, n_docs=n_docs)
    cut = 19
    if seg is not None:
        seg[:, cut] = seg[:, cut - 1]
    whole = loss_and_grads(_fn("chunkwise", 8), tensors, seg, state)

    def split(q, k, v, ig, fg, segment_ids, initial_state):
        first = [x[:, :, :cut] for x in (q, k, v, ig, fg)]
        second = [x[:, :, cut:] for x in (q, k, v, ig, fg)]
        s1_seg = None if segment_ids is None else segment_ids[:, :cut]
        s2_seg = None if segment_ids is None else segment_ids[:, cut:]
        h1, s1 = mlstm(*first, segment_ids=s1_seg, initial_state=initial_state, backend="chunkwise",
                       chunk_size=4, return_final_state=True)
        h2, s2 = mlstm(*second, segment_ids=s2_seg, initial_state=s1, backend="recurrent",
                       return_final_state=True)
        return torch.cat([h1, h2], dim=2), s2

    _assert_same(loss_and_grads(split, tensors, seg, state), whole)


def test_documents_are_independent():
    """A packed row equals each document run alone from the fresh state (first one from the initial state)."""
    tensors, _, state = make_inputs(1, 2, 23, 8, 4, with_state=True)
    seg = torch.tensor([[0] * 5 + [1] + [2] * 9 + [0] * 8])  # lengths 5, 1, 9, 8; id 0 reused
    h = mlstm(*tensors, segment_ids=seg, initial_state=state, backend="chunkwise", chunk_size=4)
    bounds = [0, 5, 6, 15, 23]
    for d, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        parts = [x[:, :, a:b] for x in tensors]
        h_d = mlstm(*parts, initial_state=state if d == 0 else None, backend="recurrent")
        torch.testing.assert_close(h[:, :, a:b], h_d, **TOL)


def test_step_matches_sequence_and_fresh_state():
    tensors, _, _ = make_inputs(2, 2, 5, 8, 8)
    h_seq, final = mlstm(*tensors, backend="parallel", return_final_state=True)
    state = mlstm_fresh_state(2, 2, 8, 8, "cpu")
    assert state[2].eq(FRESH_M).all() and state[0].dtype == torch.float32
    for t in range(5):
        h_t, state = mlstm_step(*[x[:, :, t] for x in tensors], state)
        torch.testing.assert_close(h_t, h_seq[:, :, t], **TOL)
    for x, y in zip(state, final):
        torch.testing.assert_close(x, y, **TOL)
    # m at the first token of a document is igate there.
    _, s1 = mlstm(*[x[:, :, :1] for x in tensors], backend="parallel", return_final_state=True)
    torch.testing.assert_close(s1[2], tensors[3][:, :, 0].detach())


@pytest.mark.parametrize("backend,cs", [("chunkwise", 8), ("parallel", None), ("recurrent", None)])
def test_extreme_gates_finite(backend, cs):
    """Gate pre-activations in -30..30 (and 1-token documents) give finite outputs, states and gradients."""
    tensors, seg, state = make_inputs(1, 2, 29, 8, 8, gate_scale=10.0, with_state=True, n_docs=5)
    with torch.no_grad():
        tensors[3].clamp_(-30, 30)
        tensors[4].clamp_(-30, 30)
        tensors[3][0, 0, :10] = 30.0
        tensors[4][0, 0, :10] = -30.0
        tensors[3][0, 1, :10] = -30.0
        tensors[4][0, 1, :10] = 30.0
    h, s, grads = loss_and_grads(_fn(backend, cs), tensors, seg, state)
    for x in (h, *s[:2], *grads):
        assert torch.isfinite(x).all()
    if backend != "recurrent":
        _assert_same((h, s, grads), loss_and_grads(_fn("recurrent"), tensors, seg, state))


def test_low_precision_inputs_return_input_dtype():
    tensors, _, _ = make_inputs(1, 2, 9, 8, 8, dtype=torch.bfloat16)
    h, (C, n, m) = mlstm(*tensors, backend="chunkwise", chunk_size=4, return_final_state=True)
    assert h.dtype == torch.bfloat16 and C.dtype == n.dtype == m.dtype == torch.float32


def test_bad_backend_and_shapes():
    tensors, _, _ = make_inputs(1, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        mlstm(*tensors, backend="nope")
    with pytest.raises(ValueError, match="gates"):
        mlstm(*tensors[:3], tensors[3][..., :2], tensors[4], backend="parallel")
