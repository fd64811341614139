"""Pure-torch mLSTM: quadratic parallel form, chunkwise form and recurrent step loop.

These are the ground truth for the Triton kernels and the CPU implementation of the student.

Semantics (identical for every form). Per batch row and head, with unstabilised states

    C_t = f_t C_{t-1} + i_t k_t v_t^T        f_t = sigmoid(fgate_t),  i_t = exp(igate_t)
    n_t = f_t n_{t-1} + i_t k_t
    h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)

computed in stabilised form: the stored state is (C_t exp(-m_t), n_t exp(-m_t), m_t) with the running
max m_t = max(logsigmoid(fgate_t) + m_{t-1}, igate_t), so the numerator and the normaliser are both
scaled by exp(-m_t) and only the eps term sees m. A new document (segment id differing from the previous
position's) resets the state to the fresh state (C = 0, n = 0, m = -inf, stored as the finite FRESH_M so
that no inf - inf appears); equivalently f_t = 0 at a document start.

Gradients: m is a stabiliser and is detached (no gradient through m or through the max that selects it);
everything else, the normaliser n and the |n^T q| branch of the max included, is differentiated exactly by
autograd. Gradients reach q, k, v, both gate pre-activations and the initial (C, n); none reaches the
initial m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MLSTMState = tuple[Tensor, Tensor, Tensor]

# m of the fresh state: "minus infinity" kept finite so that exp(FRESH_M - m) is exactly 0 without NaNs.
FRESH_M = -1e30


def mlstm_fresh_state(batch: int, heads: int, dqk: int, dv: int, device=None) -> MLSTMState:
    """The stabilised state of an empty document: C = 0 (B,NH,DQK,DV), n = 0 (B,NH,DQK), m = FRESH_M (B,NH),
    all float32."""
    return (
        torch.zeros(batch, heads, dqk, dv, dtype=torch.float32, device=device),
        torch.zeros(batch, heads, dqk, dtype=torch.float32, device=device),
        torch.full((batch, heads), FRESH_M, dtype=torch.float32, device=device),
    )


def check_segment_ids(segment_ids: Tensor, batch: int, seqlen: int) -> None:
    """Raise a ValueError naming the expected shape unless segment_ids is (B, S)."""
    if segment_ids.shape != (batch, seqlen):
        raise ValueError(
            f"segment_ids must have shape (B, S) = {(batch, seqlen)}, got {tuple(segment_ids.shape)}"
        )


def document_index(segment_ids: Tensor | None, batch: int, seqlen: int, device) -> Tensor:
    """(B, S) int64: 0 for the first document of each row, +1 at every position whose id changes."""
    if segment_ids is None:
        return torch.zeros(batch, seqlen, dtype=torch.long, device=device)
    check_segment_ids(segment_ids, batch, seqlen)
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return torch.cat([torch.zeros_like(change[:, :1]), change.cumsum(1)], dim=1)


def _chunk(q, k, v, igate, logf, doc, doc_prev, state, eps):
    """One chunk in quadratic form, continuing `state` (which belongs to document `doc_prev`).

    q, k: (B,NH,L,DQK); v: (B,NH,L,DV); igate, logf: (B,NH,L); doc: (B,L) document index per position;
    doc_prev: (B,) document index of the incoming state. Returns h (B,NH,L,DV) and the state after the chunk.
    """
    C0, n0, m0 = state
    L = q.shape[2]
    b = logf.cumsum(-1)  # (B,NH,L) log of the forget product since the chunk start
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    mask = (same_doc & causal)[:, None]  # (B,1,L,L)
    logD = torch.where(mask, b[..., :, None] - b[..., None, :] + igate[..., None, :], -torch.inf)
    carry = (doc == doc_prev[:, None])[:, None]  # (B,1,L): position still in the incoming document
    log_inter = torch.where(carry, b + m0[..., None], -torch.inf)
    m = torch.maximum(logD.amax(-1), log_inter).detach()  # (B,NH,L)

    P = torch.exp(logD - m[..., None])
    s_inter = torch.exp(log_inter - m)
    S = (q @ k.transpose(-1, -2)) * P
    num = S @ v + s_inter[..., None] * (q @ C0)
    den = S.sum(-1) + s_inter * (q @ n0[..., None]).squeeze(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)[..., None]

    m_last = m[..., -1]
    w = torch.exp(logD[..., -1, :] - m_last[..., None])  # (B,NH,L) weight of each key in the new state
    g = s_inter[..., -1]  # decay of the incoming state
    C = g[..., None, None] * C0 + (k * w[..., None]).transpose(-1, -2) @ v
    n = g[..., None] * n0 + (k * w[..., None]).sum(-2)
    return h, (C, n, m_last)


def _prepare(q, k, v, igate, fgate, segment_ids, initial_state):
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    gates_ok = igate.shape == (B, NH, S) and fgate.shape == (B, NH, S)
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or not gates_ok:
        raise ValueError(
            f"mlstm shapes: q,k (B,NH,S,DQK), v (B,NH,S,DV), gates (B,NH,S); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, igate {tuple(igate.shape)}, fgate {tuple(fgate.shape)}"
        )
    dtype = torch.promote_types(q.dtype, torch.float32)
    state = initial_state if initial_state is not None else mlstm_fresh_state(B, NH, DQK, DV, q.device)
    state = tuple(x.to(dtype) for x in state)
    doc = document_index(segment_ids, B, S, q.device)
    return (
        q.to(dtype), k.to(dtype), v.to(dtype), igate.to(dtype), F.logsigmoid(fgate.to(dtype)), doc, state
    )


def mlstm_chunkwise(
    q: Tensor,  # (B, NH, S, DQK)
    k: Tensor,  # (B, NH, S, DQK)
    v: Tensor,  # (B, NH, S, DV)
    igate: Tensor,  # (B, NH, S)
    fgate: Tensor,  # (B, NH, S)
    *,
    segment_ids: Tensor | None = None,  # (B, S)
    initial_state: MLSTMState | None = None,
    chunk_size: int | None = 64,
    eps: float = 1e-6,
) -> tuple[Tensor, MLSTMState]:
    """Chunkwise form: quadratic inside chunks of `chunk_size` (None: one chunk, the parallel form), states
    between chunks. Computes in float32 (float64 for float64 inputs). Returns h (B,NH,S,DV) in q's dtype
    and the final state. See the module docstring for semantics and what the backward (autograd)
    differentiates."""
    S = q.shape[2]
    q_, k_, v_, ig, logf, doc, state = _prepare(q, k, v, igate, fgate, segment_ids, initial_state)
    L = S if chunk_size is None else chunk_size
    doc_prev = torch.zeros_like(doc[:, 0])
    hs = []
    for start in range(0, S, L):
        sl = slice(start, min(start + L, S))
        h, state = _chunk(q_[:, :, sl], k_[:, :, sl], v_[:, :, sl], ig[..., sl], logf[..., sl],
                          doc[:, sl], doc_prev, state, eps)
        doc_prev = doc[:, sl.stop - 1]
        hs.append(h)
    return torch.cat(hs, dim=2).to(q.dtype), state


def mlstm_parallel(q, k, v, igate, fgate, *, segment_ids=None, initial_state=None, eps=1e-6):
    """Quadratic parallel form (one chunk of length S); same arguments and semantics as mlstm_chunkwise."""
    return mlstm_chunkwise(q, k, v, igate, fgate, segment_ids=segment_ids, initial_state=initial_state,
                           chunk_size=None, eps=eps)


def mlstm_step_reference(
    q: Tensor,  # (B, NH, DQK)
    k: Tensor,  # (B, NH, DQK)
    v: Tensor,  # (B, NH, DV)
    igate: Tensor,  # (B, NH)
    fgate: Tensor,  # (B, NH)
    state: MLSTMState,
    eps: float = 1e-6,
) -> tuple[Tensor, MLSTMState]:
    """One recurrent step in stabilised form; returns h (B,NH,DV) in q's dtype and the new fp32 (fp64 for
    fp64 inputs) state."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    C, n, m = (x.to(dtype) for x in state)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    logf = F.logsigmoid(fgate.to(dtype))
    ig = igate.to(dtype)
    m_new = torch.maximum(logf + m, ig).detach()
    f = torch.exp(logf + m - m_new)
    i = torch.exp(ig - m_new)
    C = f[..., None, None] * C + i[..., None, None] * kf[..., :, None] * vf[..., None, :]
    n = f[..., None] * n + i[..., None] * kf
    num = (qf[..., :, None] * C).sum(-2)
    den = (qf * n).sum(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps)[..., None]
    return h.to(q.dtype), (C, n, m_new)


def mlstm_recurrent(q, k, v, igate, fgate, *, segment_ids=None, initial_state=None, eps=1e-6):
    """Step-by-step loop over the sequence (resetting to the fresh state at document starts); same arguments
    and semantics as mlstm_chunkwise."""
    B, NH, S, DQK = q.shape
    q_, k_, v_, ig, _, doc, state = _prepare(q, k, v, igate, fgate, segment_ids, initial_state)
    fg = fgate.to(q_.dtype)
    fresh = mlstm_fresh_state(B, NH, DQK, v.shape[-1], q.device)
    hs = []
    for t in range(S):
        if t > 0:
            reset = (doc[:, t] != doc[:, t - 1])[:, None]  # (B,1)
            state = (
                torch.where(reset[..., None, None], fresh[0].to(q_.dtype), state[0]),
                torch.where(reset[..., None], fresh[1].to(q_.dtype), state[1]),
                torch.where(reset, fresh[2].to(q_.dtype), state[2]),
            )
        step_in = (q_[:, :, t], k_[:, :, t], v_[:, :, t], ig[..., t], fg[..., t])
        h, state = mlstm_step_reference(*step_in, state, eps)
        hs.append(h)
    return torch.stack(hs, dim=2).to(q.dtype), state
