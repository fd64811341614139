"""mLSTM and attention kernels of lit-xdistill (imported as `xdistill_kernels`; depends on torch and triton).

Public API: mlstm, mlstm_step, mlstm_fresh_state, attention, MLSTMState, and the hybrid mixer's fused
per-position ops feature_map, gate_activations, gate_mix (`fused_mixer_ops.py`, imported on first use so that
TRITON_INTERPRET can be set before any Triton kernel is defined). Semantics of the mLSTM (and what its backward
differentiates) are stated in `reference.py`; docs/kernels.md has the derivations and design notes.
"""

from __future__ import annotations

from torch import Tensor

from .attention import attention
from .reference import (
    MLSTMState,
    mlstm_chunkwise,
    mlstm_fresh_state,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_step_reference,
)

__all__ = [
    "MLSTMState", "attention", "feature_map", "gate_activations", "gate_mix", "mlstm", "mlstm_fresh_state",
    "mlstm_step",
]

_FUSED_MIXER_OPS = ("feature_map", "gate_activations", "gate_mix")


def __getattr__(name: str):
    """The fused mixer ops, imported from `fused_mixer_ops` on first access (module docstring)."""
    if name in _FUSED_MIXER_OPS:
        from . import fused_mixer_ops

        return getattr(fused_mixer_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mlstm(
    q: Tensor,  # (B, NH, S, DQK), already feature-mapped; no scaling inside
    k: Tensor,  # (B, NH, S, DQK)
    v: Tensor,  # (B, NH, S, DV)
    igate: Tensor,  # (B, NH, S) input-gate pre-activation: i = exp(igate)
    fgate: Tensor,  # (B, NH, S) forget-gate pre-activation: f = sigmoid(fgate), used as logsigmoid
    *,
    segment_ids: Tensor | None = None,  # (B, S) integer ids; the state resets where the id changes
    initial_state: MLSTMState | None = None,  # continued by the first position (fresh if None)
    return_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    state_block: int | None = None,
    eps: float = 1e-6,
) -> Tensor | tuple[Tensor, MLSTMState]:
    """The mLSTM over a sequence: h (B,NH,S,DV) in q's dtype, plus the final fp32 state if asked.

    h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps) with C_t = f_t C_{t-1} + i_t k_t v_t^T,
    n_t = f_t n_{t-1} + i_t k_t, computed in stabilised form (m_t = max(logsigmoid(fgate_t) + m_{t-1},
    igate_t)). The backward treats m as a constant stabiliser and differentiates everything else exactly,
    the normaliser n included; gradients reach q, k, v, igate, fgate and the initial (C, n), and upstream
    gradients on the returned final (C, n) are supported.

    backend: "auto" (triton on CUDA, chunkwise torch otherwise), "triton", "chunkwise", "parallel",
    "recurrent". chunk_size: for "chunkwise" (default 64) and "triton" (default: heuristic). state_block: "triton"
    only, the tile edge of its sequential state kernels (default 64; smaller runs more programs in parallel).
    """
    if backend == "auto":
        backend = "triton" if q.is_cuda else "chunkwise"
    kwargs = dict(segment_ids=segment_ids, initial_state=initial_state, eps=eps)
    if backend == "triton":
        from .chunkwise_triton import mlstm_triton

        h, state = mlstm_triton(q, k, v, igate, fgate, chunk_size=chunk_size, state_block=state_block,
                                return_final_state=return_final_state, **kwargs)
    elif backend == "chunkwise":
        h, state = mlstm_chunkwise(q, k, v, igate, fgate, chunk_size=chunk_size or 64, **kwargs)
    elif backend == "parallel":
        h, state = mlstm_parallel(q, k, v, igate, fgate, **kwargs)
    elif backend == "recurrent":
        h, state = mlstm_recurrent(q, k, v, igate, fgate, **kwargs)
    else:
        raise ValueError(
            f"mlstm: unknown backend {backend!r}; use auto, triton, chunkwise, parallel or recurrent"
        )
    return (h, state) if return_final_state else h


def mlstm_step(
    q: Tensor,  # (B, NH, DQK)
    k: Tensor,  # (B, NH, DQK)
    v: Tensor,  # (B, NH, DV)
    igate: Tensor,  # (B, NH)
    fgate: Tensor,  # (B, NH)
    state: MLSTMState,
    eps: float = 1e-6,
) -> tuple[Tensor, MLSTMState]:
    """One decoding step: h (B,NH,DV) in q's dtype and the new fp32 state.

    Triton kernel on CUDA when no input needs a gradient, torch otherwise (autograd as in mlstm)."""
    needs_grad = any(x.requires_grad for x in (q, k, v, igate, fgate, *state))
    if q.is_cuda and not needs_grad:
        from .step_triton import mlstm_step_triton

        return mlstm_step_triton(q, k, v, igate, fgate, state, eps)
    return mlstm_step_reference(q, k, v, igate, fgate, state, eps)
