"""One mLSTM decoding step as a Triton kernel (forward only; memory-bound: it reads and writes the state).

Same semantics as reference.mlstm_step_reference: with m_new = max(logsigmoid(fgate) + m, igate),
C' = exp(logsigmoid(fgate) + m - m_new) C + exp(igate - m_new) k v^T (n likewise), h = C'^T q /
(max(|n'^T q|, exp(-m_new)) + eps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import CompiledLaunch
from .reference import MLSTMState


@CompiledLaunch
@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr,  # (B*NH, DQK), (B*NH, DQK), (B*NH, DV)
    ig_ptr, fg_ptr,  # (B*NH,) gate pre-activations
    c_ptr, n_ptr, m_ptr,  # (B*NH, DQK, DV), (B*NH, DQK), (B*NH,) fp32 state in
    h_ptr, co_ptr, no_ptr, mo_ptr,  # (B*NH, DV) output, new state out (fp32)
    eps,
    DQK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
):
    bh, vb = tl.program_id(0), tl.program_id(1)
    # torch.compile (inductor) passes Python floats to Triton kernels as fp64, which would promote this kernel's
    # arithmetic to fp64 (and fail tl.dot's fp32 accumulator check); plain launches pass fp32
    eps = tl.cast(eps, tl.float32)
    ok = tl.arange(0, DQK)
    ov = vb * BV + tl.arange(0, BV)
    C = tl.load(c_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :])
    n = tl.load(n_ptr + bh * DQK + ok)
    m = tl.load(m_ptr + bh)
    q = tl.load(q_ptr + bh * DQK + ok).to(tl.float32)
    k = tl.load(k_ptr + bh * DQK + ok).to(tl.float32)
    v = tl.load(v_ptr + bh * DV + ov).to(tl.float32)
    ig = tl.load(ig_ptr + bh).to(tl.float32)
    fg = tl.load(fg_ptr + bh).to(tl.float32)
    logf = tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg)))  # logsigmoid, no overflow
    m_new = tl.maximum(logf + m, ig)
    f = tl.exp(logf + m - m_new)
    i = tl.exp(ig - m_new)
    C = f * C + i * k[:, None] * v[None, :]
    n = f * n + i * k
    den = tl.sum(q * n, 0)
    h = tl.sum(q[:, None] * C, 0) / (tl.maximum(tl.abs(den), tl.exp(-m_new)) + eps)
    tl.store(h_ptr + bh * DV + ov, h.to(h_ptr.dtype.element_ty))
    tl.store(co_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :], C)
    if vb == 0:
        tl.store(no_ptr + bh * DQK + ok, n)
        tl.store(mo_ptr + bh, m_new)


def mlstm_step_triton(
    q: Tensor,  # (B, NH, DQK)
    k: Tensor,  # (B, NH, DQK)
    v: Tensor,  # (B, NH, DV)
    igate: Tensor,  # (B, NH)
    fgate: Tensor,  # (B, NH)
    state: MLSTMState,  # (B, NH, DQK, DV), (B, NH, DQK), (B, NH) fp32
    eps: float = 1e-6,
) -> tuple[Tensor, MLSTMState]:
    """One decoding step; returns h (B,NH,DV) in q's dtype and a new fp32 state (the input state is kept)."""
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    C, n, m = (x.float().contiguous() for x in state)
    h = torch.empty(B, NH, DV, device=q.device, dtype=q.dtype)
    C_new, n_new, m_new = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    BV = min(DV, 64)
    _step_kernel[(B * NH, DV // BV)](
        q.contiguous(), k.contiguous(), v.contiguous(), igate.contiguous(), fgate.contiguous(),
        C, n, m, h, C_new, n_new, m_new, eps, DQK=DQK, DV=DV, BV=BV, num_warps=4)
    return h, (C_new, n_new, m_new)
