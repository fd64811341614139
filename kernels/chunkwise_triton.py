"""Chunkwise-parallel mLSTM in Triton: forward and backward behind one torch.autograd.Function.

Same semantics as reference.py (stabilised mLSTM, documents reset the state, initial/final state). The
sequence is cut into chunks of L positions. Six kernels (and two carry passes), each program owning one (batch,
head) or part of it:

  forward  _fwd_states   sequential over chunks: the stabilised state (C, n, m) entering every chunk; with
                         state segments, over each segment's chunks from a fresh state, then _fwd_carry
                         (parallel) adds the state carried in from the segments before
           _fwd_output   parallel over chunks: h = intra-chunk quadratic part + inter-chunk part from the
                         state, saving the normaliser den and the stabiliser m per position
  backward _bwd_dden     parallel: the gradient dden of the normaliser per position
           _bwd_states   sequential over chunks in reverse: dC, dn of the state leaving every chunk (by
                         segments, then _bwd_carry, as in the forward)
           _bwd_grads    parallel over chunks: dq, dk, dv, plus q.dq and k.dk per position; optionally as
                         two launches, dq/dk and dv (split_bwd)
           _bwd_gates    parallel over blocks of positions: the gate gradients from q.dq and k.dk, each
                         block's suffix sums carried in from per-chunk sums (_bwd_chunk_sums)

Launch settings of every kernel (warps, pipelining depths, the split) come from _config; _launch_overrides is
the private hook through which the benchmark sweeps them.

Backward semantics: m is a constant stabiliser (detached, as in the reference); everything else is
differentiated exactly, the normaliser n and the |n^T q| branch of max(|n^T q|, exp(-m)) included. This is
the augmented-value view: den is one more value column (v = 1) whose output gradient is dden.
docs/kernels.md derives the formulas and counts FLOPs and bytes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import CompiledLaunch, cdiv, next_power_of_2
from .reference import FRESH_M as _FRESH_M
from .reference import MLSTMState, check_segment_ids, document_index

FRESH_M = tl.constexpr(_FRESH_M)  # m of the fresh state, a compile-time constant inside the kernels


@triton.jit
def _chunk_gates(ig_ptr, fg_ptr, seg_ptr, c, S, L: tl.constexpr, HAS_DOC: tl.constexpr):
    """Per-position scalars of chunk c (pointers already at this row): cumulative log forget b (L,), igate
    (L,), validity, the last position's b, and the chunk's documents: `starts` (L,) where a document starts,
    `in_first` (L,) valid and still in the incoming state's document, `in_last` (L,) valid and in the chunk's
    last document, and `has_start` = `has_start_last` (scalar: some document starts in the chunk, so the
    incoming state does not reach its end). A document starts where the segment id differs from the previous
    position's (the chunk's first position compares with the last of the chunk before; position 0 continues
    the initial state).

    The ids are read here with two vector loads, not from a precomputed index: no host ops per call, and no
    scalar loads on the state kernels' chain, which the pipeliner cannot issue ahead. The first and last start
    are one reduction each, where a document index would be a scan (cumsum) across the warps: the state
    kernels run one step per chunk on a sequential chain, and most chunks hold no start at all; only the
    intra-chunk L x L mask needs the index, and only in chunks with a start (_intra_logits)."""
    offs = c * L + tl.arange(0, L)
    valid = offs < S
    fg = tl.load(fg_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ig = tl.load(ig_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    lf = tl.where(valid, tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg))), 0.0)  # logsigmoid
    b = tl.cumsum(lf, 0)
    starts, in_first, in_last, has_start, has_start_last = _chunk_docs(seg_ptr, offs, valid, c, L, HAS_DOC)
    return offs, valid, b, ig, tl.sum(lf, 0), starts, in_first, in_last, has_start, has_start_last


@triton.jit
def _chunk_docs(seg_ptr, offs, valid, c, L: tl.constexpr, HAS_DOC: tl.constexpr):
    """The documents of chunk c (positions offs, validity valid; seg_ptr at this row): starts, in_first,
    in_last, has_start and has_start_last as _chunk_gates returns them."""
    if HAS_DOC:
        seg = tl.load(seg_ptr + offs, mask=valid, other=0)
        seg_before = tl.load(seg_ptr + offs - 1, mask=valid & (offs > 0), other=0)
        starts = valid & (offs > 0) & (seg != seg_before)
        first = tl.min(tl.where(starts, offs, c * L + L), 0)  # c * L + L: no start
        last = tl.max(tl.where(starts, offs, c * L - 1), 0)  # c * L - 1: no start
        in_first = valid & (offs < first)
        in_last = valid & (offs >= last)
        # the same fact from either reduction: a kernel that uses only one of in_first / in_last takes the flag
        # of the same reduction, and the compiler drops the other
        has_start = first < c * L + L
        has_start_last = last >= c * L
    else:
        starts = offs < 0  # none
        in_first = valid
        in_last = valid
        has_start = False
        has_start_last = False
    return starts, in_first, in_last, has_start, has_start_last


@triton.jit
def _intra_logits(b, ig, valid, starts, has_start, L: tl.constexpr, HAS_DOC: tl.constexpr):
    """(L, L) log weights b_i - b_j + ig_j of key j for query i; -inf unless j <= i in the same document. The
    document index (a cumsum of the starts) and its L x L compare run only in chunks where a document starts."""
    i = tl.arange(0, L)[:, None]
    j = tl.arange(0, L)[None, :]
    if not HAS_DOC:
        # With one document the index compare changes no value (0 on valid positions, -1 past S), but the
        # kernels compiled with it, in this order, ran ~1 % faster (H100, fourteenth session, an A/B in one
        # process at 16k and 64k): otherwise ptxas allocates registers differently and spills more (_fwd_output
        # 48 -> 56 B, the dv half 448 -> 520 B at L = 128, D = 128; offline, triton 3.6, sm_90a).
        doc = tl.where(valid, 0, -1)
        mask = (j <= i) & (doc[:, None] == doc[None, :]) & valid[None, :] & valid[:, None]
    else:
        mask = (j <= i) & valid[None, :] & valid[:, None]
        if has_start:
            doc = tl.cumsum(starts.to(tl.int32), 0)
            mask = mask & (doc[:, None] == doc[None, :])
    return tl.where(mask, b[:, None] - b[None, :] + ig[None, :], float("-inf"))


def carry_width(G: int, NC: int, DQK: int, DV: int) -> int:
    """Row length (fp32 elements per batch x head) of the segment-carry buffer of G segments over NC chunks:
    G states (C, n, m), G segment log decays, NC per-chunk log decays and NC per-chunk max-states (_carry_row)."""
    return G * (DQK * DV + DQK + 2) + 2 * NC


@triton.jit
def _carry_row(carry_ptr, bh, W, G, DQK: tl.constexpr, DV: tl.constexpr):
    """Pointers to the parts of row bh of the segment-carry buffer: per segment t, a state (C at the first
    pointer + t DQK DV, n at the second + t DQK, m at the third + t) and a log decay (the fourth + t); per chunk
    c, a log decay (the fifth + c) and the forward's local max-state (the fifth + NC + c). The forward keeps
    there each segment's end state and the log decay of the carried state from the segment's start to its end
    and to each chunk's start; the backward each segment's start gradient (dC, dn) and the log decay from the
    segment's end back to its start and to each chunk's end. -inf where a document starts in between: nothing
    is carried across. _fwd_carry reads the local m from here, not from ms, which it rewrites while other
    programs of the same chunk still read."""
    c_at = carry_ptr + bh * W
    n_at = c_at + G * DQK * DV
    m_at = n_at + G * DQK
    return c_at, n_at, m_at, m_at + G, m_at + 2 * G


@triton.jit
def _store_segment(carry_ptr, bh, W, G, t, C, n, m, log_decay, ok, ov, kb, vb, DQK: tl.constexpr,
                   DV: tl.constexpr):
    """Store segment t's state (C tile, n block, m) and log decay in row bh of the carry buffer (_carry_row)."""
    c_at, n_at, m_at, d_at, _ = _carry_row(carry_ptr, bh, W, G, DQK, DV)
    tl.store(c_at + t * DQK * DV + ok[:, None] * DV + ov[None, :], C)
    if vb == 0:
        tl.store(n_at + t * DQK + ok, n)
    if (kb == 0) & (vb == 0):
        tl.store(m_at + t, m)
        tl.store(d_at + t, log_decay)


@triton.jit
def _load_segment(carry_ptr, bh, W, G, t, ok, ov, DQK: tl.constexpr, DV: tl.constexpr):
    """Segment t's state (C tile, n block, m) and log decay from row bh of the carry buffer (_carry_row)."""
    c_at, n_at, m_at, d_at, _ = _carry_row(carry_ptr, bh, W, G, DQK, DV)
    C = tl.load(c_at + t * DQK * DV + ok[:, None] * DV + ov[None, :])
    return C, tl.load(n_at + t * DQK + ok), tl.load(m_at + t), tl.load(d_at + t)


@triton.jit
def _carry_in(C_loc, n_loc, m_loc, log_decay, C_in, n_in, m_in):
    """The stabilised state after a stretch of chunks that started from the fresh state (C_loc, n_loc, m_loc:
    the local state, scaled by e^-m_loc) when the state (C_in, n_in, m_in) entered the stretch instead, decayed
    by e^log_decay across it. Unscaled, the state is linear in what entered: C = C_loc e^m_loc + C_in e^(m_in +
    log_decay); the max-state is the max of the two exponents, as the sequential recurrence's m is a max over
    the same terms (exact up to rounding). log_decay = -inf (a document started) keeps the local state."""
    m = tl.maximum(m_loc, log_decay + m_in)
    a = tl.exp(m_loc - m)
    beta = tl.exp(log_decay + m_in - m)
    return a * C_loc + beta * C_in, a * n_loc + beta * n_in, m


@triton.jit
def _segment_span(NC, K, DV: tl.constexpr, BV: tl.constexpr, SEGMENTED: tl.constexpr):
    """A state-kernel program's DV tile vb, segment t and chunk range [c_lo, c_hi) from grid axis 2, which holds
    the DV tiles and, if SEGMENTED, the segments of K chunks (otherwise one segment: all NC chunks)."""
    if SEGMENTED:
        vb = tl.program_id(2) % (DV // BV)
        t = tl.program_id(2) // (DV // BV)
        c_lo = t * K
        c_hi = tl.minimum(c_lo + K, NC)
    else:
        vb = tl.program_id(2)
        t = 0
        c_lo = 0
        c_hi = NC
    return vb, t, c_lo, c_hi


@CompiledLaunch
@triton.jit
def _fwd_states(
    k_ptr, v_ptr,  # (B, NH, S, DQK), (B, NH, S, DV)
    ig_ptr, fg_ptr,  # (B, NH, S) gate pre-activations
    seg_ptr,  # (B, S) int32/int64 segment ids (read only if HAS_DOC)
    c0_ptr, n0_ptr, m0_ptr,  # (B, NH, DQK, DV), (B, NH, DQK), (B, NH) initial state, fp32 (if HAS_INIT)
    cs_ptr, ns_ptr, ms_ptr,  # (B*NH, NC, DQK, DV) in input dtype, (B*NH, NC, DQK) fp32, (B*NH, NC+1) fp32
    cf_ptr, nf_ptr, mf_ptr,  # (B, NH, DQK, DV), (B, NH, DQK), (B, NH) final state, fp32 (if HAS_FINAL)
    carry_ptr,  # (B*NH, W) fp32: each segment's end state and decays (if SEGMENTED; layout: _carry_row)
    NH, S, NC, K, G, W,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr,
    NUM_STAGES: tl.constexpr, SEGMENTED: tl.constexpr,
):
    """SEGMENTED (state_segments > 1 in _config): the chunks are cut into G segments of K, one program per
    segment along grid axis 2 (with the DV tiles). Segment t > 0 starts from the fresh state, so every program
    walks a chain of K chunk steps instead of NC, and stores its local states plus what _fwd_carry needs to
    add the state carried in from the segments before: its end state and, per chunk, the log decay since the
    segment's start (-inf once a document starts). Segment 0 starts from the initial state and is exact."""
    bh, kb = tl.program_id(0), tl.program_id(1)
    vb, t, c_lo, c_hi = _segment_span(NC, K, DV, BV, SEGMENTED)
    ok = kb * BK + tl.arange(0, BK)
    ov = vb * BV + tl.arange(0, BV)
    k_ptr += bh * S * DQK
    v_ptr += bh * S * DV
    ig_ptr += bh * S
    fg_ptr += bh * S
    seg_ptr += (bh // NH) * S
    if HAS_INIT and SEGMENTED:  # segment 0 only; the others' masked loads give the fresh state
        C = tl.load(c0_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :],
                    mask=tl.full((BK, BV), 0, tl.int32) == t, other=0.0)
        n = tl.load(n0_ptr + bh * DQK + ok, mask=tl.full((BK,), 0, tl.int32) == t, other=0.0)
        m = tl.where(t == 0, tl.load(m0_ptr + bh), FRESH_M)
    elif HAS_INIT:
        C = tl.load(c0_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :])
        n = tl.load(n0_ptr + bh * DQK + ok)
        m = tl.load(m0_ptr + bh)
    else:
        C = tl.zeros((BK, BV), dtype=tl.float32)
        n = tl.zeros((BK,), dtype=tl.float32)
        m = tl.full([], FRESH_M, tl.float32)
    if not SEGMENTED:
        if (kb == 0) & (vb == 0):
            tl.store(ms_ptr + bh * (NC + 1), m)
    log_decay = tl.full([], 0.0, tl.float32)  # log of the decay from the segment's start to chunk c's
    chunk_decay_at = _carry_row(carry_ptr, bh, W, G, DQK, DV)[4]
    # Only C, n, m carry over between chunks: chunk c+1's loads do not depend on chunk c, so the pipeliner may
    # issue them while chunk c computes (NUM_STAGES, see _config).
    for c in tl.range(c_lo, c_hi, num_stages=NUM_STAGES):
        tl.store(cs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :],
                 C.to(cs_ptr.dtype.element_ty))
        if vb == 0:
            tl.store(ns_ptr + (bh * NC + c) * DQK + ok, n)
        if SEGMENTED:  # m entering each chunk (exact in segment 0, local in the others) and its decay
            if (kb == 0) & (vb == 0):
                tl.store(ms_ptr + bh * (NC + 1) + c, m, mask=t == 0)
                tl.store(chunk_decay_at + c, log_decay)
                tl.store(chunk_decay_at + NC + c, m)
        offs, valid, b, ig, b_last, starts, in_first, in_last, has_start, has_start_last = _chunk_gates(
            ig_ptr, fg_ptr, seg_ptr, c, S, L, HAS_DOC)
        a_last = tl.where(has_start_last, float("-inf"), b_last + m)  # with in_last: one reduction
        logw = tl.where(in_last, b_last - b + ig, float("-inf"))
        m_new = tl.maximum(a_last, tl.max(logw, 0))
        g = tl.exp(a_last - m_new)
        w = tl.exp(logw - m_new)
        k = tl.load(k_ptr + offs[:, None] * DQK + ok[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs[:, None] * DV + ov[None, :], mask=valid[:, None], other=0.0)
        kw = k.to(tl.float32) * w[:, None]
        C = g * C + tl.dot(tl.trans(kw.to(k.dtype)), v, input_precision=PREC)
        n = g * n + tl.sum(kw, 0)
        m = m_new
        if SEGMENTED:
            log_decay = tl.where(has_start_last, float("-inf"), log_decay + b_last)
        else:
            if (kb == 0) & (vb == 0):
                tl.store(ms_ptr + bh * (NC + 1) + c + 1, m)
    if SEGMENTED:  # the segment's end: its local state and total log decay, for _fwd_carry
        _store_segment(carry_ptr, bh, W, G, t, C, n, m, log_decay, ok, ov, kb, vb, DQK, DV)
    elif HAS_FINAL:
        tl.store(cf_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :], C)
        if vb == 0:
            tl.store(nf_ptr + bh * DQK + ok, n)
        if (kb == 0) & (vb == 0):
            tl.store(mf_ptr + bh, m)


@CompiledLaunch
@triton.jit
def _fwd_carry(
    carry_ptr,  # (B*NH, W) fp32 from the segmented _fwd_states
    cs_ptr, ns_ptr, ms_ptr,  # chunk states of _fwd_states, corrected in place
    cf_ptr, nf_ptr, mf_ptr,  # final state, fp32 (if HAS_FINAL)
    NC, K, G, W, CB,
    DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_FINAL: tl.constexpr,
):
    """Adds to each local chunk state of segments 1..G-1 the state carried in from the segments before: segment
    0's end state (exact), carried through segments 1..t-1 by their end states and decays. One program per
    block of CB chunks of one segment and per tile: memory-bound, so the carried state is formed once per
    block (t - 1 steps of tiles from L2) and the chunks' loads are pipelined. The block holding the last chunk
    also writes ms[NC] and the final state."""
    nb = tl.cdiv(K, CB)
    t = 1 + tl.program_id(0) // nb
    c_lo = t * K + (tl.program_id(0) % nb) * CB
    c_hi = tl.minimum(tl.minimum(c_lo + CB, t * K + K), NC)
    bh = tl.program_id(1)
    kb = tl.program_id(2) // (DV // BV)
    vb = tl.program_id(2) % (DV // BV)
    ok = kb * BK + tl.arange(0, BK)
    ov = vb * BV + tl.arange(0, BV)
    C_in, n_in, m_in, _ = _load_segment(carry_ptr, bh, W, G, 0, ok, ov, DQK, DV)
    for s in range(1, t):
        C_end, n_end, m_end, log_decay = _load_segment(carry_ptr, bh, W, G, s, ok, ov, DQK, DV)
        C_in, n_in, m_in = _carry_in(C_end, n_end, m_end, log_decay, C_in, n_in, m_in)
    chunk_decay_at = _carry_row(carry_ptr, bh, W, G, DQK, DV)[4]
    for c in tl.range(c_lo, c_hi, num_stages=2):
        tile = (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :]
        C_loc = tl.load(cs_ptr + tile).to(tl.float32)
        # n: only the vb == 0 programs, which rewrite it, read it
        n_loc = tl.load(ns_ptr + (bh * NC + c) * DQK + ok, mask=tl.full((BK,), 0, tl.int32) == vb, other=0.0)
        C, n, m = _carry_in(C_loc, n_loc, tl.load(chunk_decay_at + NC + c), tl.load(chunk_decay_at + c),
                            C_in, n_in, m_in)
        tl.store(cs_ptr + tile, C.to(cs_ptr.dtype.element_ty))
        if vb == 0:
            tl.store(ns_ptr + (bh * NC + c) * DQK + ok, n)
        if (kb == 0) & (vb == 0):
            tl.store(ms_ptr + bh * (NC + 1) + c, m)
    if (c_lo < NC) & (c_hi == NC):  # the state after the last chunk
        C_loc, n_loc, m_loc, log_decay = _load_segment(carry_ptr, bh, W, G, G - 1, ok, ov, DQK, DV)
        C, n, m = _carry_in(C_loc, n_loc, m_loc, log_decay, C_in, n_in, m_in)
        if (kb == 0) & (vb == 0):
            tl.store(ms_ptr + bh * (NC + 1) + NC, m)
        if HAS_FINAL:
            tl.store(cf_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :], C)
            if vb == 0:
                tl.store(nf_ptr + bh * DQK + ok, n)
            if (kb == 0) & (vb == 0):
                tl.store(mf_ptr + bh, m)


@triton.jit
def _starts_in_chunk(seg_ptr, NH, S, L: tl.constexpr):
    """Whether a document starts in chunk program_id(0) of row program_id(1). With DOC_BRANCH (doc_branch in
    _config; documents only), _fwd_output and _bwd_grads branch on it: a chunk without a start runs the
    one-document code, whose masks are then exact (every position continues the incoming state and feeds the
    outgoing one), and only chunks with a start run the document code; the two are compiled side by side in
    one kernel."""
    c, bh = tl.program_id(0), tl.program_id(1)
    offs = c * L + tl.arange(0, L)
    return _chunk_docs(seg_ptr + (bh // NH) * S, offs, offs < S, c, L, True)[3]


@triton.jit
def _fwd_output_chunk(
    q_ptr, k_ptr, v_ptr,  # (B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV)
    ig_ptr, fg_ptr, seg_ptr,  # (B, NH, S) x2 gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    cs_ptr, ns_ptr, ms_ptr,  # chunk states from _fwd_states
    h_ptr,  # (B, NH, S, DV) output, input dtype
    den_ptr, mi_ptr,  # (B, NH, S) fp32: signed stabilised normaliser n^T q and stabiliser m per position
    NH, S, NC, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, OUT_RESTRUCTURED: tl.constexpr,
):
    """OUT_RESTRUCTURED (output_restructured in _config): the same math ordered for fewer live registers: q k^T
    first (without the q C accumulator beside it), gated and cast to the input dtype once, then q C as the
    accumulator of the (q k^T * P) v dot; q is loaded twice. Only the fp32 summation order of num differs."""
    c, bh, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # torch.compile (inductor) passes Python floats to Triton kernels as fp64, which would promote this kernel's
    # arithmetic to fp64 (and fail tl.dot's fp32 accumulator check); plain launches pass fp32
    eps = tl.cast(eps, tl.float32)
    ov = vb * BV + tl.arange(0, BV)
    offs, valid, b, ig, b_last, starts, in_first, in_last, has_start, has_start_last = _chunk_gates(
        ig_ptr + bh * S, fg_ptr + bh * S, seg_ptr + (bh // NH) * S, c, S, L, HAS_DOC)
    m_c = tl.load(ms_ptr + bh * (NC + 1) + c)
    log_inter = tl.where(in_first, b + m_c, float("-inf"))
    logD = _intra_logits(b, ig, valid, starts, has_start, L, HAS_DOC)
    m_i = tl.where(valid, tl.maximum(log_inter, tl.max(logD, 1)), 0.0)
    P = tl.exp(logD - m_i[:, None])
    s_inter = tl.exp(log_inter - m_i)

    if OUT_RESTRUCTURED:
        rows = bh * S + offs[:, None]
        qk = tl.zeros((L, L), dtype=tl.float32)
        for kb in tl.static_range(DQK // BK):
            ok = kb * BK + tl.arange(0, BK)
            q = tl.load(q_ptr + rows * DQK + ok[None, :], mask=valid[:, None], other=0.0)
            k = tl.load(k_ptr + rows * DQK + ok[None, :], mask=valid[:, None], other=0.0)
            qk += tl.dot(q, tl.trans(k), input_precision=PREC)
        Smat = qk * P
        den = tl.sum(Smat, 1)
        Sc = Smat.to(v_ptr.dtype.element_ty)
        q_c = tl.zeros((L, BV), dtype=tl.float32)  # q^T C_c
        q_n = tl.zeros((L,), dtype=tl.float32)  # q^T n_c
        for kb in tl.static_range(DQK // BK):
            ok = kb * BK + tl.arange(0, BK)
            q = tl.load(q_ptr + rows * DQK + ok[None, :], mask=valid[:, None], other=0.0)
            C = tl.load(cs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :])
            n = tl.load(ns_ptr + (bh * NC + c) * DQK + ok)
            q_c += tl.dot(q, C.to(q.dtype), input_precision=PREC)
            q_n += tl.sum(q.to(tl.float32) * n[None, :], 1)
        v = tl.load(v_ptr + rows * DV + ov[None, :], mask=valid[:, None], other=0.0)
        num = tl.dot(Sc, v, s_inter[:, None] * q_c, input_precision=PREC)
        den += s_inter * q_n
    else:
        qk = tl.zeros((L, L), dtype=tl.float32)
        q_c = tl.zeros((L, BV), dtype=tl.float32)  # q^T C_c
        q_n = tl.zeros((L,), dtype=tl.float32)  # q^T n_c
        for kb in tl.static_range(DQK // BK):
            ok = kb * BK + tl.arange(0, BK)
            q = tl.load(q_ptr + (bh * S + offs[:, None]) * DQK + ok[None, :], mask=valid[:, None], other=0.0)
            k = tl.load(k_ptr + (bh * S + offs[:, None]) * DQK + ok[None, :], mask=valid[:, None], other=0.0)
            C = tl.load(cs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :])
            n = tl.load(ns_ptr + (bh * NC + c) * DQK + ok)
            qk += tl.dot(q, tl.trans(k), input_precision=PREC)
            q_c += tl.dot(q, C.to(q.dtype), input_precision=PREC)
            q_n += tl.sum(q.to(tl.float32) * n[None, :], 1)
        Smat = qk * P
        v = tl.load(v_ptr + (bh * S + offs[:, None]) * DV + ov[None, :], mask=valid[:, None], other=0.0)
        num = tl.dot(Smat.to(v.dtype), v, input_precision=PREC) + s_inter[:, None] * q_c
        den = tl.sum(Smat, 1) + s_inter * q_n
    z = tl.maximum(tl.abs(den), tl.exp(-m_i)) + eps
    h = num / z[:, None]
    tl.store(h_ptr + (bh * S + offs[:, None]) * DV + ov[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None])
    if vb == 0:
        tl.store(den_ptr + bh * S + offs, den, mask=valid)
        tl.store(mi_ptr + bh * S + offs, m_i, mask=valid)


@CompiledLaunch
@triton.jit
def _fwd_output(
    q_ptr, k_ptr, v_ptr,  # (B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV)
    ig_ptr, fg_ptr, seg_ptr,  # (B, NH, S) x2 gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    cs_ptr, ns_ptr, ms_ptr,  # chunk states from _fwd_states
    h_ptr,  # (B, NH, S, DV) output, input dtype
    den_ptr, mi_ptr,  # (B, NH, S) fp32: signed stabilised normaliser n^T q and stabiliser m per position
    NH, S, NC, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, OUT_RESTRUCTURED: tl.constexpr,
    DOC_BRANCH: tl.constexpr,
):
    """_fwd_output_chunk for chunk program_id(0) of row program_id(1); DOC_BRANCH: _starts_in_chunk."""
    if HAS_DOC and DOC_BRANCH:
        if _starts_in_chunk(seg_ptr, NH, S, L):
            _fwd_output_chunk(q_ptr, k_ptr, v_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, h_ptr, den_ptr,
                mi_ptr, NH, S, NC, eps, DQK, DV, L, BK, BV, PREC, True, OUT_RESTRUCTURED)
        else:
            _fwd_output_chunk(q_ptr, k_ptr, v_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, h_ptr, den_ptr,
                mi_ptr, NH, S, NC, eps, DQK, DV, L, BK, BV, PREC, False, OUT_RESTRUCTURED)
    else:
        _fwd_output_chunk(q_ptr, k_ptr, v_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, h_ptr, den_ptr,
            mi_ptr, NH, S, NC, eps, DQK, DV, L, BK, BV, PREC, HAS_DOC, OUT_RESTRUCTURED)


@CompiledLaunch
@triton.jit
def _bwd_dden(
    h_ptr, dh_ptr,  # (B, NH, S, DV) output and its gradient
    den_ptr, mi_ptr,  # (B, NH, S) fp32 from the forward
    dden_ptr,  # (B, NH, S) fp32 output
    S, eps,
    DV: tl.constexpr, BS: tl.constexpr, BV: tl.constexpr,
):
    """h = num / z with z = max(|den|, exp(-m)) + eps, so dden = -(dh.h) / z * sign(den) on the |den| branch
    of the max and 0 on the exp(-m) branch (m is constant)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    eps = tl.cast(eps, tl.float32)  # as in _fwd_output
    offs = blk * BS + tl.arange(0, BS)
    valid = offs < S
    dh_h = tl.zeros((BS,), dtype=tl.float32)
    for vb in tl.static_range(DV // BV):
        ov = vb * BV + tl.arange(0, BV)
        rows = (bh * S + offs[:, None]) * DV + ov[None, :]
        dh = tl.load(dh_ptr + rows, mask=valid[:, None], other=0.0)
        h = tl.load(h_ptr + rows, mask=valid[:, None], other=0.0)
        dh_h += tl.sum(dh.to(tl.float32) * h.to(tl.float32), 1)
    den = tl.load(den_ptr + bh * S + offs, mask=valid, other=1.0)
    m_i = tl.load(mi_ptr + bh * S + offs, mask=valid, other=0.0)
    floor = tl.exp(-m_i)
    sel = tl.where(tl.abs(den) >= floor, tl.where(den >= 0, 1.0, -1.0), 0.0)
    tl.store(dden_ptr + bh * S + offs, -dh_h / (tl.maximum(tl.abs(den), floor) + eps) * sel, mask=valid)


@triton.jit
def _chunk_stabilisers(ms_ptr, mi_ptr, den_ptr, bh, c, NC, S, offs, valid, b, in_first, eps):
    """What both backward kernels read for chunk c: the max states m_c and m_{c+1} around it, each query's
    stabiliser m_i, 1 / its normaliser (rz, as in the forward) and the decay of the carried state into each
    query (s_inter: zero past a document boundary)."""
    m_c = tl.load(ms_ptr + bh * (NC + 1) + c)
    m_next = tl.load(ms_ptr + bh * (NC + 1) + c + 1)
    m_i = tl.load(mi_ptr + bh * S + offs, mask=valid, other=0.0)
    den = tl.load(den_ptr + bh * S + offs, mask=valid, other=1.0)
    rz = 1.0 / (tl.maximum(tl.abs(den), tl.exp(-m_i)) + eps)
    s_inter = tl.where(in_first, tl.exp(b + m_c - m_i), 0.0)
    return m_c, m_next, m_i, rz, s_inter


@CompiledLaunch
@triton.jit
def _bwd_states(
    q_ptr, dh_ptr,  # (B, NH, S, DQK), (B, NH, S, DV) gradient of the output
    ig_ptr, fg_ptr, seg_ptr,  # (B, NH, S) x2 gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    ms_ptr, den_ptr, mi_ptr,  # (B*NH, NC+1), (B, NH, S), (B, NH, S) fp32 from the forward
    dcf_ptr, dnf_ptr,  # (B, NH, DQK, DV), (B, NH, DQK) fp32 gradient of the final state (if HAS_DFINAL)
    dcs_ptr, dns_ptr,  # (B*NH, NC, DQK, DV) input dtype, (B*NH, NC, DQK) fp32: gradient of the state
                       # leaving each chunk
    dc0_ptr, dn0_ptr,  # (B, NH, DQK, DV), (B, NH, DQK) fp32 gradient of the initial state (if HAS_INIT)
    dden_ptr,  # (B, NH, S) fp32 gradient of den per position, from _bwd_dden
    carry_ptr,  # (B*NH, W) fp32: each segment's start gradient and decays (if SEGMENTED; layout: _carry_row)
    NH, S, NC, K, G, W, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
    NUM_STAGES: tl.constexpr, DDEN_PREFETCH: tl.constexpr, SEGMENTED: tl.constexpr,
):
    """DDEN_PREFETCH (dden_prefetch in _config): dden is loaded outside the `if vb == 0` branch, masked by vb == 0,
    so the pipeliner issues it ahead through cp.async like the other per-position loads; by default it is a
    synchronous global load on the vb == 0 programs' chain. The same values either way.
    SEGMENTED: as in _fwd_states, in reverse: segment t < G - 1 starts from a zero gradient at its end, and
    _bwd_carry adds what flows back from the segments after it (the segment's start gradient and the log decay
    to each chunk's end are stored for it). The decays use the forward's max-states, so nothing is rescaled."""
    bh, kb = tl.program_id(0), tl.program_id(1)
    vb, t, c_lo, c_hi = _segment_span(NC, K, DV, BV, SEGMENTED)
    eps = tl.cast(eps, tl.float32)  # as in _fwd_output
    ok = kb * BK + tl.arange(0, BK)
    ov = vb * BV + tl.arange(0, BV)
    if HAS_DFINAL and SEGMENTED:  # the last segment only; the others' masked loads give zero
        dC = tl.load(dcf_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :],
                     mask=tl.full((BK, BV), 0, tl.int32) == t - (G - 1), other=0.0)
        dn = tl.load(dnf_ptr + bh * DQK + ok, mask=tl.full((BK,), 0, tl.int32) == t - (G - 1), other=0.0)
    elif HAS_DFINAL:
        dC = tl.load(dcf_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :])
        dn = tl.load(dnf_ptr + bh * DQK + ok)
    else:
        dC = tl.zeros((BK, BV), dtype=tl.float32)
        dn = tl.zeros((BK,), dtype=tl.float32)
    log_decay = tl.full([], 0.0, tl.float32)  # log of the decay from the segment's end back to chunk c's end
    chunk_decay_at = _carry_row(carry_ptr, bh, W, G, DQK, DV)[4]
    for i in tl.range(c_hi - c_lo, num_stages=NUM_STAGES):  # as in _fwd_states, only dC and dn carry over
        c = c_hi - 1 - i
        tl.store(dcs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :],
                 dC.to(dcs_ptr.dtype.element_ty))
        if vb == 0:
            tl.store(dns_ptr + (bh * NC + c) * DQK + ok, dn)
        if SEGMENTED:
            if (kb == 0) & (vb == 0):
                tl.store(chunk_decay_at + c, log_decay)
        offs, valid, b, ig, b_last, starts, in_first, in_last, has_start, has_start_last = _chunk_gates(
            ig_ptr + bh * S, fg_ptr + bh * S, seg_ptr + (bh // NH) * S, c, S, L, HAS_DOC)
        m_c, m_next, m_i, rz, s_inter = _chunk_stabilisers(ms_ptr, mi_ptr, den_ptr, bh, c, NC, S, offs, valid,
                                                           b, in_first, eps)
        g = tl.where(has_start, 0.0, tl.exp(b_last + m_c - m_next))
        q = tl.load(q_ptr + (bh * S + offs[:, None]) * DQK + ok[None, :], mask=valid[:, None], other=0.0)
        dh = tl.load(dh_ptr + (bh * S + offs[:, None]) * DV + ov[None, :], mask=valid[:, None], other=0.0)
        if DDEN_PREFETCH:  # valid & (vb == 0): programs with vb > 0 load nothing
            dden = tl.load(dden_ptr + bh * S + offs, mask=offs < tl.where(vb == 0, S, 0), other=0.0)
        qs = q.to(tl.float32) * (s_inter * rz)[:, None]
        dC = g * dC + tl.dot(tl.trans(qs.to(q.dtype)), dh, input_precision=PREC)
        if vb == 0:
            if not DDEN_PREFETCH:
                dden = tl.load(dden_ptr + bh * S + offs, mask=valid, other=0.0)
            dn = g * dn + tl.sum(q.to(tl.float32) * (s_inter * dden)[:, None], 0)
        if SEGMENTED:  # log g, as g above
            log_decay = tl.where(has_start, float("-inf"), log_decay + b_last + m_c - m_next)
    if SEGMENTED:  # the segment's start gradient and total log decay, for _bwd_carry (which writes dC0, dn0)
        _store_segment(carry_ptr, bh, W, G, t, dC, dn, 0.0, log_decay, ok, ov, kb, vb, DQK, DV)
    elif HAS_INIT:
        tl.store(dc0_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :], dC)
        if vb == 0:
            tl.store(dn0_ptr + bh * DQK + ok, dn)


@CompiledLaunch
@triton.jit
def _bwd_carry(
    carry_ptr,  # (B*NH, W) fp32 from the segmented _bwd_states
    dcs_ptr, dns_ptr,  # gradients of the states leaving each chunk, corrected in place
    dc0_ptr, dn0_ptr,  # gradient of the initial state, fp32 (if HAS_INIT)
    NC, K, G, W, CB,
    DQK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """Adds to each local gradient of segments 0..G-2 what flows back from the segments after: the last
    segment's start gradient (exact: it started from the final state's gradient), carried back through
    segments G-2..t+1 by their start gradients and decays (all in the forward's stabilised frame, decays <= 1).
    Blocks of CB chunks as in _fwd_carry; the first block of segment 0 also writes the initial state's
    gradient."""
    nb = tl.cdiv(K, CB)
    t = tl.program_id(0) // nb
    c_lo = t * K + (tl.program_id(0) % nb) * CB
    c_hi = tl.minimum(c_lo + CB, t * K + K)
    bh = tl.program_id(1)
    kb = tl.program_id(2) // (DV // BV)
    vb = tl.program_id(2) % (DV // BV)
    ok = kb * BK + tl.arange(0, BK)
    ov = vb * BV + tl.arange(0, BV)
    dC_in, dn_in, _, _ = _load_segment(carry_ptr, bh, W, G, G - 1, ok, ov, DQK, DV)
    for i in range(0, G - 2 - t):
        dC_start, dn_start, _, log_decay = _load_segment(carry_ptr, bh, W, G, G - 2 - i, ok, ov, DQK, DV)
        dC_in = dC_start + tl.exp(log_decay) * dC_in
        dn_in = dn_start + tl.exp(log_decay) * dn_in
    chunk_decay_at = _carry_row(carry_ptr, bh, W, G, DQK, DV)[4]
    for c in tl.range(c_lo, c_hi, num_stages=2):
        tile = (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :]
        decay = tl.exp(tl.load(chunk_decay_at + c))
        dC = tl.load(dcs_ptr + tile).to(tl.float32) + decay * dC_in
        tl.store(dcs_ptr + tile, dC.to(dcs_ptr.dtype.element_ty))
        if vb == 0:
            tl.store(dns_ptr + (bh * NC + c) * DQK + ok, tl.load(dns_ptr + (bh * NC + c) * DQK + ok) + decay * dn_in)
    if HAS_INIT:
        if c_lo == 0:
            dC_loc, dn_loc, _, log_decay = _load_segment(carry_ptr, bh, W, G, 0, ok, ov, DQK, DV)
            tl.store(dc0_ptr + bh * DQK * DV + ok[:, None] * DV + ov[None, :], dC_loc + tl.exp(log_decay) * dC_in)
            if vb == 0:
                tl.store(dn0_ptr + bh * DQK + ok, dn_loc + tl.exp(log_decay) * dn_in)


@triton.jit
def _row_dots(a_ptr, b_ptr, rows_a, rows_b, mask_a, mask_b, D: tl.constexpr, BD: tl.constexpr, LA: tl.constexpr,
              LB: tl.constexpr, PREC: tl.constexpr):
    """(LA, LB) fp32 a_i . b_j over rows rows_a of a and rows_b of b, two row-major (., D) tensors, D in BD-wide
    blocks."""
    acc = tl.zeros((LA, LB), dtype=tl.float32)
    for db in tl.static_range(D // BD):
        od = db * BD + tl.arange(0, BD)
        a = tl.load(a_ptr + rows_a * D + od[None, :], mask=mask_a, other=0.0)
        b = tl.load(b_ptr + rows_b * D + od[None, :], mask=mask_b, other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PREC)
    return acc


@triton.jit
def _halves(x, H: tl.constexpr):
    """(x[:H], x[H:]) of a vector of 2H elements: Triton tensors have no slices."""
    return tl.split(tl.permute(tl.reshape(x, (2, H)), (1, 0)))


@triton.jit
def _chunk_halves(bh, c, S, starts, L: tl.constexpr, HAS_DOC: tl.constexpr):
    """The two halves of chunk c, H = L / 2 positions each: positions, validity, row offsets into (B*NH*S, .)
    tensors, and document indices (a cumsum of the chunk's starts; zeros without documents)."""
    H: tl.constexpr = L // 2
    offs0 = c * L + tl.arange(0, H)
    offs1 = offs0 + H
    if HAS_DOC:
        doc0, doc1 = _halves(tl.cumsum(starts.to(tl.int32), 0), H)
    else:
        doc0 = tl.zeros((H,), dtype=tl.int32)
        doc1 = doc0
    return (offs0, offs1, offs0 < S, offs1 < S, (bh * S + offs0)[:, None], (bh * S + offs1)[:, None], doc0,
            doc1)


@triton.jit
def _sub_decays(b_i, b_j, ig_j, m_i, valid_i, valid_j, doc_i, doc_j, DIAG: tl.constexpr, HAS_DOC: tl.constexpr,
                H: tl.constexpr):
    """(H, H) gated decays exp(b_i - b_j + ig_j - m_i) of keys j for queries i, as P from _intra_logits, for one
    sub-tile of a chunk: DIAG (a diagonal sub-tile) keeps j <= i, an off-diagonal one (queries after every key)
    keeps every valid pair; masked pairs are 0."""
    mask = valid_i[:, None] & valid_j[None, :]
    if DIAG:
        mask = mask & (tl.arange(0, H)[None, :] <= tl.arange(0, H)[:, None])
    if HAS_DOC:
        mask = mask & (doc_i[:, None] == doc_j[None, :])
    return tl.exp(tl.where(mask, b_i[:, None] - b_j[None, :] + ig_j[None, :], float("-inf")) - m_i[:, None])


@triton.jit
def _bwd_dv_subtiles(q_ptr, k_ptr, dh_ptr, dcs_ptr, dv_ptr, bh, c, S, NC, b, ig, starts, m_i, rz, w,
                     DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PREC: tl.constexpr, HAS_DOC: tl.constexpr):
    """dv of chunk c from S's three causal H x H sub-tiles (H = L / 2): (first half of the queries, first half
    of the keys), (second, first) and (second, second). The fourth, (first, second), is zero (keys after every
    query) and skipped: a quarter fewer intra-chunk products, and H x H tiles in registers instead of L x L.
    The same terms as the L x L form; only the fp32 summation order of dv changes."""
    H: tl.constexpr = L // 2
    offs0, offs1, valid0, valid1, rows0, rows1, doc0, doc1 = _chunk_halves(bh, c, S, starts, L, HAS_DOC)
    b0, b1 = _halves(b, H)
    ig0, ig1 = _halves(ig, H)
    m0, m1 = _halves(m_i, H)
    rz0, rz1 = _halves(rz, H)
    w0, w1 = _halves(w, H)
    dt = q_ptr.dtype.element_ty
    S00 = _row_dots(q_ptr, k_ptr, rows0, rows0, valid0[:, None], valid0[:, None], DQK, BK, H, H, PREC)
    S00 = (S00 * _sub_decays(b0, b0, ig0, m0, valid0, valid0, doc0, doc0, True, HAS_DOC, H)).to(dt)
    S10 = _row_dots(q_ptr, k_ptr, rows1, rows0, valid1[:, None], valid0[:, None], DQK, BK, H, H, PREC)
    S10 = (S10 * _sub_decays(b1, b0, ig0, m1, valid1, valid0, doc1, doc0, False, HAS_DOC, H)).to(dt)
    S11 = _row_dots(q_ptr, k_ptr, rows1, rows1, valid1[:, None], valid1[:, None], DQK, BK, H, H, PREC)
    S11 = (S11 * _sub_decays(b1, b1, ig1, m1, valid1, valid1, doc1, doc1, True, HAS_DOC, H)).to(dt)
    for vb in tl.static_range(DV // BV):
        ov = vb * BV + tl.arange(0, BV)
        dh0 = tl.load(dh_ptr + rows0 * DV + ov[None, :], mask=valid0[:, None], other=0.0)
        dh1 = tl.load(dh_ptr + rows1 * DV + ov[None, :], mask=valid1[:, None], other=0.0)
        dnum0 = (dh0.to(tl.float32) * rz0[:, None]).to(dt)
        dnum1 = (dh1.to(tl.float32) * rz1[:, None]).to(dt)
        dv0 = tl.dot(tl.trans(S00), dnum0, input_precision=PREC)
        dv0 = tl.dot(tl.trans(S10), dnum1, dv0, input_precision=PREC)
        dv1 = tl.dot(tl.trans(S11), dnum1, input_precision=PREC)
        inter0 = tl.zeros((H, BV), dtype=tl.float32)
        inter1 = tl.zeros((H, BV), dtype=tl.float32)
        for kb in tl.static_range(DQK // BK):
            ok = kb * BK + tl.arange(0, BK)
            dC = tl.load(dcs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :]).to(dt)
            k0 = tl.load(k_ptr + rows0 * DQK + ok[None, :], mask=valid0[:, None], other=0.0)
            inter0 += tl.dot(k0, dC, input_precision=PREC)
            k1 = tl.load(k_ptr + rows1 * DQK + ok[None, :], mask=valid1[:, None], other=0.0)
            inter1 += tl.dot(k1, dC, input_precision=PREC)
        dv0 += w0[:, None] * inter0
        dv1 += w1[:, None] * inter1
        tl.store(dv_ptr + rows0 * DV + ov[None, :], dv0.to(dv_ptr.dtype.element_ty), mask=valid0[:, None])
        tl.store(dv_ptr + rows1 * DV + ov[None, :], dv1.to(dv_ptr.dtype.element_ty), mask=valid1[:, None])


@triton.jit
def _row_state_dots(x_ptr, st_ptr, rows, state_rows, mask, DV: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
                    BK: tl.constexpr, PREC: tl.constexpr):
    """(L, BK) fp32 x_i . s_r over the chunk's rows of a row-major (., DV) tensor and a BK-row block of a chunk
    state (state_rows: the block's row offsets), DV in BV-wide blocks: the inter-chunk part of dq (dh C^T) or of
    dk (v dC^T)."""
    acc = tl.zeros((L, BK), dtype=tl.float32)
    for vb in tl.static_range(DV // BV):
        ov = vb * BV + tl.arange(0, BV)
        x = tl.load(x_ptr + rows * DV + ov[None, :], mask=mask, other=0.0)
        st = tl.load(st_ptr + state_rows + ov[None, :])
        acc += tl.dot(x, tl.trans(st.to(x.dtype)), input_precision=PREC)
    return acc


@triton.jit
def _bwd_dqdk_subtiles(q_ptr, k_ptr, v_ptr, dh_ptr, cs_ptr, ns_ptr, dcs_ptr, dns_ptr, dq_ptr, dk_ptr, qdq_ptr, kdk_ptr,
                       bh, c, S, NC, b, ig, starts, m_i, rz, s_inter, dden, w,
                       DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       PREC: tl.constexpr, HAS_DOC: tl.constexpr):
    """dq, dk, q.dq and k.dk of chunk c from dS's three causal H x H sub-tiles (H = L / 2), as _bwd_dv_subtiles,
    in the order of the restructured block (each inter-chunk part the accumulator of its intra-chunk dot): per
    DQK block, dq of each query half, then dk of each key half. The same terms; only fp32 summation order
    changes."""
    H: tl.constexpr = L // 2
    offs0, offs1, valid0, valid1, rows0, rows1, doc0, doc1 = _chunk_halves(bh, c, S, starts, L, HAS_DOC)
    b0, b1 = _halves(b, H)
    ig0, ig1 = _halves(ig, H)
    m0, m1 = _halves(m_i, H)
    rz0, rz1 = _halves(rz, H)
    si0, si1 = _halves(s_inter, H)
    dd0, dd1 = _halves(dden, H)
    w0, w1 = _halves(w, H)
    dt = q_ptr.dtype.element_ty
    dS00 = _row_dots(dh_ptr, v_ptr, rows0, rows0, valid0[:, None], valid0[:, None], DV, BV, H, H, PREC)
    dS00 = ((dS00 * rz0[:, None] + dd0[:, None])
            * _sub_decays(b0, b0, ig0, m0, valid0, valid0, doc0, doc0, True, HAS_DOC, H)).to(dt)
    dS10 = _row_dots(dh_ptr, v_ptr, rows1, rows0, valid1[:, None], valid0[:, None], DV, BV, H, H, PREC)
    dS10 = ((dS10 * rz1[:, None] + dd1[:, None])
            * _sub_decays(b1, b0, ig0, m1, valid1, valid0, doc1, doc0, False, HAS_DOC, H)).to(dt)
    dS11 = _row_dots(dh_ptr, v_ptr, rows1, rows1, valid1[:, None], valid1[:, None], DV, BV, H, H, PREC)
    dS11 = ((dS11 * rz1[:, None] + dd1[:, None])
            * _sub_decays(b1, b1, ig1, m1, valid1, valid1, doc1, doc1, True, HAS_DOC, H)).to(dt)
    qdq0 = tl.zeros((H,), dtype=tl.float32)
    qdq1 = tl.zeros((H,), dtype=tl.float32)
    kdk0 = tl.zeros((H,), dtype=tl.float32)
    kdk1 = tl.zeros((H,), dtype=tl.float32)
    for kb in tl.static_range(DQK // BK):  # dq of both query halves, then dk (fewer live tiles)
        ok = kb * BK + tl.arange(0, BK)
        state_rows = (bh * NC + c) * DQK * DV + ok[:, None] * DV
        n = tl.load(ns_ptr + (bh * NC + c) * DQK + ok)
        k0 = tl.load(k_ptr + rows0 * DQK + ok[None, :], mask=valid0[:, None], other=0.0)
        dq0 = _row_state_dots(dh_ptr, cs_ptr, rows0, state_rows, valid0[:, None], DV, BV, H, BK, PREC)
        dq0 = tl.dot(dS00, k0, (si0 * rz0)[:, None] * dq0 + (si0 * dd0)[:, None] * n[None, :], input_precision=PREC)
        tl.store(dq_ptr + rows0 * DQK + ok[None, :], dq0.to(dq_ptr.dtype.element_ty), mask=valid0[:, None])
        q0 = tl.load(q_ptr + rows0 * DQK + ok[None, :], mask=valid0[:, None], other=0.0)
        qdq0 += tl.sum(q0.to(tl.float32) * dq0, 1)
        dq1 = _row_state_dots(dh_ptr, cs_ptr, rows1, state_rows, valid1[:, None], DV, BV, H, BK, PREC)
        dq1 = tl.dot(dS10, k0, (si1 * rz1)[:, None] * dq1 + (si1 * dd1)[:, None] * n[None, :], input_precision=PREC)
        k1 = tl.load(k_ptr + rows1 * DQK + ok[None, :], mask=valid1[:, None], other=0.0)
        dq1 = tl.dot(dS11, k1, dq1, input_precision=PREC)
        tl.store(dq_ptr + rows1 * DQK + ok[None, :], dq1.to(dq_ptr.dtype.element_ty), mask=valid1[:, None])
        q1 = tl.load(q_ptr + rows1 * DQK + ok[None, :], mask=valid1[:, None], other=0.0)
        qdq1 += tl.sum(q1.to(tl.float32) * dq1, 1)
    for kb in tl.static_range(DQK // BK):
        ok = kb * BK + tl.arange(0, BK)
        state_rows = (bh * NC + c) * DQK * DV + ok[:, None] * DV
        dn = tl.load(dns_ptr + (bh * NC + c) * DQK + ok)
        q0 = tl.load(q_ptr + rows0 * DQK + ok[None, :], mask=valid0[:, None], other=0.0)
        q1 = tl.load(q_ptr + rows1 * DQK + ok[None, :], mask=valid1[:, None], other=0.0)
        dk0 = _row_state_dots(v_ptr, dcs_ptr, rows0, state_rows, valid0[:, None], DV, BV, H, BK, PREC)
        dk0 = tl.dot(tl.trans(dS00), q0, w0[:, None] * (dk0 + dn[None, :]), input_precision=PREC)
        dk0 = tl.dot(tl.trans(dS10), q1, dk0, input_precision=PREC)
        tl.store(dk_ptr + rows0 * DQK + ok[None, :], dk0.to(dk_ptr.dtype.element_ty), mask=valid0[:, None])
        k0 = tl.load(k_ptr + rows0 * DQK + ok[None, :], mask=valid0[:, None], other=0.0)
        kdk0 += tl.sum(k0.to(tl.float32) * dk0, 1)
        dk1 = _row_state_dots(v_ptr, dcs_ptr, rows1, state_rows, valid1[:, None], DV, BV, H, BK, PREC)
        dk1 = tl.dot(tl.trans(dS11), q1, w1[:, None] * (dk1 + dn[None, :]), input_precision=PREC)
        tl.store(dk_ptr + rows1 * DQK + ok[None, :], dk1.to(dk_ptr.dtype.element_ty), mask=valid1[:, None])
        k1 = tl.load(k_ptr + rows1 * DQK + ok[None, :], mask=valid1[:, None], other=0.0)
        kdk1 += tl.sum(k1.to(tl.float32) * dk1, 1)
    tl.store(qdq_ptr + bh * S + offs0, qdq0, mask=valid0)
    tl.store(qdq_ptr + bh * S + offs1, qdq1, mask=valid1)
    tl.store(kdk_ptr + bh * S + offs0, kdk0, mask=valid0)
    tl.store(kdk_ptr + bh * S + offs1, kdk1, mask=valid1)


@triton.jit
def _bwd_grads_chunk(
    q_ptr, k_ptr, v_ptr, dh_ptr,  # (B, NH, S, DQK) x2, (B, NH, S, DV) x2
    ig_ptr, fg_ptr, seg_ptr,  # (B, NH, S) x2 gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    cs_ptr, ns_ptr, ms_ptr,  # forward chunk states
    den_ptr, mi_ptr, dden_ptr,  # (B, NH, S) fp32
    dcs_ptr, dns_ptr,  # gradient of the state leaving each chunk, from _bwd_states
    dq_ptr, dk_ptr, dv_ptr,  # outputs, input dtype
    qdq_ptr, kdk_ptr,  # (B, NH, S) fp32 outputs: q.dq and k.dk per position
    NH, S, NC, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, DO_DQDK: tl.constexpr, DO_DV: tl.constexpr,
    DQDK_RESTRUCTURED: tl.constexpr, DV_SUBTILES: tl.constexpr, DQDK_SUBTILES: tl.constexpr,
):
    """DO_DQDK: dq, dk, q.dq and k.dk, which need the L x L matrix dS; DO_DV: dv, which needs S. Both (one
    kernel) or one per launch (split_bwd in _config): then each compiled kernel holds one of the two L x L
    tiles besides P, and unneeded loads are dropped; docs/kernels.md counts registers and bytes.
    DQDK_RESTRUCTURED (split dq/dk launch only, dqdk_restructured in _config): the same dq/dk math ordered for
    fewer live registers: dS cast to the input dtype once, dq finished (and stored) before dk starts, and each
    inter-chunk part passed as the accumulator of the intra-chunk dot; only the fp32 summation order differs.
    DV_SUBTILES (split dv launch only, dv_subtiles in _config): dv from the chunk's three causal half-size
    sub-tiles (_bwd_dv_subtiles) instead of the L x L tile; DQDK_SUBTILES (split dq/dk launch only, dqdk_subtiles)
    likewise dq, dk, q.dq and k.dk (_bwd_dqdk_subtiles)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    eps = tl.cast(eps, tl.float32)  # as in _fwd_output
    offs, valid, b, ig, b_last, starts, in_first, in_last, has_start, has_start_last = _chunk_gates(
        ig_ptr + bh * S, fg_ptr + bh * S, seg_ptr + (bh // NH) * S, c, S, L, HAS_DOC)
    m_c, m_next, m_i, rz, s_inter = _chunk_stabilisers(ms_ptr, mi_ptr, den_ptr, bh, c, NC, S, offs, valid,
                                                       b, in_first, eps)
    dden = tl.load(dden_ptr + bh * S + offs, mask=valid, other=0.0)
    w = tl.where(in_last, tl.exp(b_last - b + ig - m_next), 0.0)
    if DV_SUBTILES:  # the split dv launch only
        _bwd_dv_subtiles(q_ptr, k_ptr, dh_ptr, dcs_ptr, dv_ptr, bh, c, S, NC, b, ig, starts, m_i, rz, w, DQK, DV, L,
                         BK, BV, PREC, HAS_DOC)
    elif DQDK_SUBTILES:  # the split dq/dk launch only
        _bwd_dqdk_subtiles(q_ptr, k_ptr, v_ptr, dh_ptr, cs_ptr, ns_ptr, dcs_ptr, dns_ptr, dq_ptr, dk_ptr, qdq_ptr,
                           kdk_ptr, bh, c, S, NC, b, ig, starts, m_i, rz, s_inter, dden, w, DQK, DV, L, BK, BV, PREC,
                           HAS_DOC)
    else:
        P = tl.exp(_intra_logits(b, ig, valid, starts, has_start, L, HAS_DOC) - m_i[:, None])
        rows = (bh * S + offs)[:, None]
        qkv_mask = valid[:, None]

        # Interleaved blocks keep the fused kernel's operation order, and so its code, as measured before the split.
        if DO_DV:
            qk = _row_dots(q_ptr, k_ptr, rows, rows, qkv_mask, qkv_mask, DQK, BK, L, L, PREC)
        if DO_DQDK:
            dhv = _row_dots(dh_ptr, v_ptr, rows, rows, qkv_mask, qkv_mask, DV, BV, L, L, PREC)
        if DO_DV:
            Smat = qk * P  # S_ij = q_i.k_j P_ij
        if DO_DQDK:
            dS = (dhv * rz[:, None] + dden[:, None]) * P  # dL/d(q_i.k_j)
            qdq = tl.zeros((L,), dtype=tl.float32)
            kdk = tl.zeros((L,), dtype=tl.float32)
            if DQDK_RESTRUCTURED:
                dSc = dS.to(k_ptr.dtype.element_ty)  # cast once; dq and dk take dSc and its transpose
                for kb in tl.static_range(DQK // BK):
                    ok = kb * BK + tl.arange(0, BK)
                    state_rows = (bh * NC + c) * DQK * DV + ok[:, None] * DV
                    dq_inter = _row_state_dots(dh_ptr, cs_ptr, rows, state_rows, qkv_mask, DV, BV, L, BK, PREC)
                    n = tl.load(ns_ptr + (bh * NC + c) * DQK + ok)
                    k = tl.load(k_ptr + rows * DQK + ok[None, :], mask=qkv_mask, other=0.0)
                    dq = tl.dot(dSc, k, (s_inter * rz)[:, None] * dq_inter + (s_inter * dden)[:, None] * n[None, :],
                                input_precision=PREC)
                    tl.store(dq_ptr + rows * DQK + ok[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qkv_mask)
                    q = tl.load(q_ptr + rows * DQK + ok[None, :], mask=qkv_mask, other=0.0)
                    qdq += tl.sum(q.to(tl.float32) * dq, 1)
                    dk_inter = _row_state_dots(v_ptr, dcs_ptr, rows, state_rows, qkv_mask, DV, BV, L, BK, PREC)
                    dn = tl.load(dns_ptr + (bh * NC + c) * DQK + ok)
                    dk = tl.dot(tl.trans(dSc).to(q.dtype), q, w[:, None] * (dk_inter + dn[None, :]),
                                input_precision=PREC)
                    tl.store(dk_ptr + rows * DQK + ok[None, :], dk.to(dk_ptr.dtype.element_ty), mask=qkv_mask)
                    kdk += tl.sum(k.to(tl.float32) * dk, 1)
            else:
                for kb in tl.static_range(DQK // BK):
                    ok = kb * BK + tl.arange(0, BK)
                    q = tl.load(q_ptr + rows * DQK + ok[None, :], mask=qkv_mask, other=0.0)
                    k = tl.load(k_ptr + rows * DQK + ok[None, :], mask=qkv_mask, other=0.0)
                    n = tl.load(ns_ptr + (bh * NC + c) * DQK + ok)
                    dn = tl.load(dns_ptr + (bh * NC + c) * DQK + ok)
                    dq = tl.dot(dS.to(k.dtype), k, input_precision=PREC) + (s_inter * dden)[:, None] * n[None, :]
                    dk = tl.dot(tl.trans(dS).to(q.dtype), q, input_precision=PREC)
                    dq_inter = tl.zeros((L, BK), dtype=tl.float32)
                    dk_inter = tl.zeros((L, BK), dtype=tl.float32)
                    for vb in tl.static_range(DV // BV):
                        ov = vb * BV + tl.arange(0, BV)
                        dh = tl.load(dh_ptr + rows * DV + ov[None, :], mask=qkv_mask, other=0.0)
                        v = tl.load(v_ptr + rows * DV + ov[None, :], mask=qkv_mask, other=0.0)
                        C = tl.load(cs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :])
                        dC = tl.load(dcs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :])
                        dq_inter += tl.dot(dh, tl.trans(C.to(dh.dtype)), input_precision=PREC)
                        dk_inter += tl.dot(v, tl.trans(dC.to(v.dtype)), input_precision=PREC)
                    dq += (s_inter * rz)[:, None] * dq_inter
                    dk += w[:, None] * (dk_inter + dn[None, :])
                    tl.store(dq_ptr + rows * DQK + ok[None, :], dq.to(dq_ptr.dtype.element_ty), mask=qkv_mask)
                    tl.store(dk_ptr + rows * DQK + ok[None, :], dk.to(dk_ptr.dtype.element_ty), mask=qkv_mask)
                    qdq += tl.sum(q.to(tl.float32) * dq, 1)
                    kdk += tl.sum(k.to(tl.float32) * dk, 1)
            tl.store(qdq_ptr + bh * S + offs, qdq, mask=valid)
            tl.store(kdk_ptr + bh * S + offs, kdk, mask=valid)
        if DO_DV:
            for vb in tl.static_range(DV // BV):
                ov = vb * BV + tl.arange(0, BV)
                dh = tl.load(dh_ptr + rows * DV + ov[None, :], mask=qkv_mask, other=0.0)
                dnum = (dh.to(tl.float32) * rz[:, None]).to(dh.dtype)
                dv = tl.dot(tl.trans(Smat).to(dh.dtype), dnum, input_precision=PREC)
                dv_inter = tl.zeros((L, BV), dtype=tl.float32)
                for kb in tl.static_range(DQK // BK):
                    ok = kb * BK + tl.arange(0, BK)
                    k = tl.load(k_ptr + rows * DQK + ok[None, :], mask=qkv_mask, other=0.0)
                    dC = tl.load(dcs_ptr + (bh * NC + c) * DQK * DV + ok[:, None] * DV + ov[None, :])
                    dv_inter += tl.dot(k, dC.to(k.dtype), input_precision=PREC)
                dv += w[:, None] * dv_inter
                tl.store(dv_ptr + rows * DV + ov[None, :], dv.to(dv_ptr.dtype.element_ty), mask=qkv_mask)


@CompiledLaunch
@triton.jit
def _bwd_grads(
    q_ptr, k_ptr, v_ptr, dh_ptr,  # (B, NH, S, DQK) x2, (B, NH, S, DV) x2
    ig_ptr, fg_ptr, seg_ptr,  # (B, NH, S) x2 gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    cs_ptr, ns_ptr, ms_ptr,  # forward chunk states
    den_ptr, mi_ptr, dden_ptr,  # (B, NH, S) fp32
    dcs_ptr, dns_ptr,  # gradient of the state leaving each chunk, from _bwd_states
    dq_ptr, dk_ptr, dv_ptr,  # outputs, input dtype
    qdq_ptr, kdk_ptr,  # (B, NH, S) fp32 outputs: q.dq and k.dk per position
    NH, S, NC, eps,
    DQK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, HAS_DOC: tl.constexpr, DO_DQDK: tl.constexpr, DO_DV: tl.constexpr,
    DQDK_RESTRUCTURED: tl.constexpr, DV_SUBTILES: tl.constexpr, DQDK_SUBTILES: tl.constexpr,
    DOC_BRANCH: tl.constexpr,
):
    """_bwd_grads_chunk for chunk program_id(0) of row program_id(1); DOC_BRANCH: _starts_in_chunk."""
    if HAS_DOC and DOC_BRANCH:
        if _starts_in_chunk(seg_ptr, NH, S, L):
            _bwd_grads_chunk(q_ptr, k_ptr, v_ptr, dh_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, den_ptr,
                mi_ptr, dden_ptr, dcs_ptr, dns_ptr, dq_ptr, dk_ptr, dv_ptr, qdq_ptr, kdk_ptr, NH, S, NC, eps, DQK, DV,
                L, BK, BV, PREC, True, DO_DQDK, DO_DV, DQDK_RESTRUCTURED, DV_SUBTILES, DQDK_SUBTILES)
        else:
            _bwd_grads_chunk(q_ptr, k_ptr, v_ptr, dh_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, den_ptr,
                mi_ptr, dden_ptr, dcs_ptr, dns_ptr, dq_ptr, dk_ptr, dv_ptr, qdq_ptr, kdk_ptr, NH, S, NC, eps, DQK, DV,
                L, BK, BV, PREC, False, DO_DQDK, DO_DV, DQDK_RESTRUCTURED, DV_SUBTILES, DQDK_SUBTILES)
    else:
        _bwd_grads_chunk(q_ptr, k_ptr, v_ptr, dh_ptr, ig_ptr, fg_ptr, seg_ptr, cs_ptr, ns_ptr, ms_ptr, den_ptr,
            mi_ptr, dden_ptr, dcs_ptr, dns_ptr, dq_ptr, dk_ptr, dv_ptr, qdq_ptr, kdk_ptr, NH, S, NC, eps, DQK, DV, L,
            BK, BV, PREC, HAS_DOC, DO_DQDK, DO_DV, DQDK_RESTRUCTURED, DV_SUBTILES, DQDK_SUBTILES)


@triton.jit
def _restart_add(v_a, restart_a, v_b, restart_b):
    """Combine of a segmented inclusive scan: an element flagged `restart` begins a new run, so the sum so far
    reaches it only if neither it nor anything between carries the flag (the standard associative operator)."""
    return tl.where(restart_b != 0, v_b, v_a + v_b), restart_a | restart_b


@CompiledLaunch
@triton.jit
def _bwd_chunk_sums(
    qdq_ptr, kdk_ptr,  # (B, NH, S) fp32 from _bwd_grads: q.dq and k.dk per position
    seg_ptr,  # (B, S) int32/int64 segment ids (if HAS_DOC)
    dbc_ptr,  # (B*NH, NC, 2) fp32 output
    NH, S, NC,
    L: tl.constexpr, HAS_DOC: tl.constexpr,
):
    """Per chunk c of row bh, what _bwd_gates carries across its blocks: the sum of q.dq - k.dk over the chunk's
    positions still in the document that entered it (at dbc[bh, c, 0]), and whether a document starts in the
    chunk (1.0 at dbc[bh, c, 1]: the suffix sums of the positions before it stop there). A launch of its own:
    the same two stores in _bwd_grads' dq/dk launch kept the (L,) mask in_first live across its dots and made
    that launch slower by about what the gate kernel gained (forward + backward with one document 2.246 -> 2.251
    ms at (1, 32, 16384, 128), H200, eighteenth session)."""
    c, bh = tl.program_id(0), tl.program_id(1)
    offs = c * L + tl.arange(0, L)
    valid = offs < S
    db = tl.load(qdq_ptr + bh * S + offs, mask=valid, other=0.0) - tl.load(kdk_ptr + bh * S + offs, mask=valid,
                                                                           other=0.0)
    _, in_first, _, has_start, _ = _chunk_docs(seg_ptr + (bh // NH) * S, offs, valid, c, L, HAS_DOC)
    tl.store(dbc_ptr + (bh * NC + c) * 2, tl.sum(tl.where(in_first, db, 0.0), 0))
    tl.store(dbc_ptr + (bh * NC + c) * 2 + 1, tl.where(has_start, 1.0, 0.0))


@CompiledLaunch
@triton.jit
def _bwd_gates(
    qdq_ptr, kdk_ptr,  # (B, NH, S) fp32 from _bwd_grads: q.dq and k.dk per position
    dbc_ptr,  # (B*NH, NC, 2) fp32 from _bwd_chunk_sums
    fg_ptr, seg_ptr,  # (B, NH, S) forget-gate pre-activations, (B, S) int32/int64 segment ids (if HAS_DOC)
    dfin_ptr,  # (B, NH) fp32: C.dC + n.dn of the final state (if HAS_DFINAL)
    dig_ptr, dfg_ptr,  # (B, NH, S) outputs in the gates' dtypes
    NH, S, NC,
    L: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr, HAS_DOC: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    """Gate gradients. Every key enters the outputs and states as k_j exp(igate_j - b_j) and every query as
    q_i exp(b_i), with b the cumulative log forget gate, so dL/digate_j = k_j.dk_j and dL/db_t = q_t.dq_t -
    k_t.dk_t (+ C.dC + n.dn of the final state at the last position). logsigmoid(fgate_s) enters every b_t with
    t >= s; within other documents those terms cancel exactly, so dL/dfgate_s = sigmoid(-fgate_s) times the sum
    over t >= s in the document of s, and the forget gate at a document start (where the state resets) gets none.

    One program per block of BS positions (a multiple of L: whole chunks) of a (batch, head) row, in parallel.
    What the suffix sums carry into the block from after its end is summed from _bwd_chunk_sums': the
    chunks after the block up to the first one in which a document starts, of which only the part before the
    start counts (BC chunk sums per load), and the final state's term if no document starts after the block.
    The block is then loaded last position first, so that its suffix sums are an inclusive scan (restarting at
    document changes) plus that carry. No prefix sums are subtracted, so fp32 loses nothing to cancellation.
    With documents the scan is segmented: it restarts at each position after which a document starts (ids
    differ from the next position's), and the carry enters at the block's first element unless a document
    starts right after it. Blocks without a start run the plain scan instead of the segmented one, a scan of
    (value, flag) pairs."""
    p, bh = tl.program_id(0), tl.program_id(1)
    carry = 0.0  # suffix sum at the first position after the block
    starts_after = 0.0  # document starts in the chunks summed so far
    for c0 in range((p + 1) * (BS // L), NC, BC):
        cs = c0 + tl.arange(0, BC)
        sums = tl.load(dbc_ptr + (bh * NC + cs) * 2, mask=cs < NC, other=0.0)
        if HAS_DOC:
            flags = tl.load(dbc_ptr + (bh * NC + cs) * 2 + 1, mask=cs < NC, other=0.0)
            # a chunk counts if no document starts in a chunk before it (its own start ends its part already)
            sums = tl.where(starts_after + tl.cumsum(flags, 0) - flags == 0.0, sums, 0.0)
            starts_after += tl.sum(flags, 0)
        carry += tl.sum(sums, 0)
    i = tl.arange(0, BS)
    offs = (p + 1) * BS - 1 - i
    valid = offs < S
    kdk = tl.load(kdk_ptr + bh * S + offs, mask=valid, other=0.0)
    db = tl.load(qdq_ptr + bh * S + offs, mask=valid, other=0.0) - kdk
    if HAS_DFINAL:
        dfin = tl.load(dfin_ptr + bh)
        db += tl.where(offs == S - 1, dfin, 0.0)
        # a block before the last position: the final state's term reaches it unless a document starts between
        carry += tl.where(((p + 1) * BS < S) & (starts_after == 0.0), dfin, 0.0)
    if HAS_DOC:
        seg_ptr += (bh // NH) * S
        seg = tl.load(seg_ptr + offs, mask=valid, other=0)
        seg_after = tl.load(seg_ptr + offs + 1, mask=offs < S - 1, other=0)
        seg_before = tl.load(seg_ptr + offs - 1, mask=valid & (offs > 0), other=0)
        # along the scan (decreasing positions) a run restarts after every document start; the carry enters at
        # the first element unless a run restarts there
        restart = (offs < S - 1) & (seg_after != seg)  # offs + 1 starts a document
        if tl.max(restart.to(tl.int32), 0) > 0:  # most blocks hold no start: the plain scan below
            db += tl.where((i == 0) & ~restart, carry, 0.0)
            dlf = tl.associative_scan((db, restart.to(tl.int32)), 0, _restart_add)[0]
        else:
            dlf = tl.cumsum(db, 0) + carry
    else:
        dlf = tl.cumsum(db, 0) + carry
    fg = tl.load(fg_ptr + bh * S + offs, mask=valid, other=0.0).to(tl.float32)
    dfg = dlf * tl.sigmoid(-fg)
    if HAS_DOC:
        dfg = tl.where((offs > 0) & (seg != seg_before), 0.0, dfg)
    tl.store(dfg_ptr + bh * S + offs, dfg.to(dfg_ptr.dtype.element_ty), mask=valid)
    tl.store(dig_ptr + bh * S + offs, kdk.to(dig_ptr.dtype.element_ty), mask=valid)


_KERNELS = ("fwd_states", "fwd_carry", "fwd_output", "bwd_dden", "bwd_states", "bwd_carry", "bwd_grads", "bwd_dqdk",
            "bwd_dv", "bwd_chunk_sums", "bwd_gates")
_FLAGS = ("split_bwd", "gates_fp32", "dqdk_restructured", "output_restructured", "dden_prefetch", "dv_subtiles",
          "dqdk_subtiles", "doc_branch")
_COUNTS = ("state_segments", "carry_block")  # ints (state_segments None: chosen per call, _state_segments)
_LAUNCH_OVERRIDES: dict = {}  # changed only through _launch_overrides


@contextlib.contextmanager
def _launch_overrides(**overrides: bool | dict[str, int | None]) -> Iterator[None]:
    """Private hook for bench_mlstm.py --launch-sweep and the tests, not an API: inside the block, _config
    applies `overrides` to its launch settings, e.g. `_launch_overrides(split_bwd=True,
    bwd_states={"NUM_STAGES": 3})`. A kernel's dict updates that kernel's entry; unknown names raise (in
    _config). The block's overrides replace, not extend, those of an enclosing block; not thread-safe."""
    saved = dict(_LAUNCH_OVERRIDES)
    _LAUNCH_OVERRIDES.clear()
    _LAUNCH_OVERRIDES.update(overrides)
    try:
        yield
    finally:
        _LAUNCH_OVERRIDES.clear()
        _LAUNCH_OVERRIDES.update(saved)


def _config(S: int, DQK: int, DV: int, dtype: torch.dtype, chunk_size: int | None,
              state_block: int | None = None) -> dict:
    """_launch_config, memoized while no _launch_overrides block is active (it runs once per forward, and at
    S = 4096 the host's time per call bounds the forward+backward). The returned dict is shared: read only."""
    if _LAUNCH_OVERRIDES:
        return _launch_config(S, DQK, DV, dtype, chunk_size, state_block)
    return _default_config(S, DQK, DV, dtype, chunk_size, state_block)


def _launch_config(S: int, DQK: int, DV: int, dtype: torch.dtype, chunk_size: int | None,
                   state_block: int | None = None) -> dict:
    """Chunk length L, block sizes and every kernel's launch settings. Default L (measured on an H100 and an
    H200, docs/benchmarks.md): 128 from S = 4096 on with head dims <= 128 (half the sequential steps of the
    state kernels, which dominate the GPU time), 64 otherwise (the intra-chunk kernels' L x L tiles cost
    registers, and short sequences have few steps). At S = 4096 L = 128 takes less GPU time (graphed, H100:
    0.671 vs 0.912 ms at head dim 128, 0.679 vs 0.829 ms at 64), and in the student's mixer at head dim 64 the
    host stays hidden (eager 1.893 vs graphed 1.903 ms). The mLSTM alone, eager, is still host-bound there (1.065
    vs 0.671 ms at head dim 128), where L = 64 would time lower (0.895 ms); the default follows the GPU time and
    the model's use (fifteenth session, docs/benchmarks.md).

    The two sequential state kernels run one program per (batch x head, DQK tile, DV tile); their tile edge
    (BKS x BVS, default 64) sets how many programs share the chain over chunks: with few heads, e.g.
    B x NH = 18 at head dim 64, a 64-tile leaves most of a 132-SM card idle (docs/benchmarks.md).

    Launch settings, one dict per kernel (passed to its launch as is): Triton's num_warps and num_stages (3 is
    Triton's default on CUDA; it only acts on scf.for loops, i.e. the state kernels' chunk loop, since the
    other kernels' static_range loops are unrolled), and for the two state kernels NUM_STAGES, the
    software-pipelining depth of tl.range over chunks (None: no annotation, the loop follows num_stages).
    Flags: split_bwd runs _bwd_grads as two launches, bwd_dqdk and bwd_dv, each holding one L x L tile;
    gates_fp32 casts the gates to fp32 before the kernels, because a bf16 gate vector of L <= 128 elements
    gives each of 128+ threads under 4 bytes, which no cp.async can load, so the pipeliner leaves those loads
    synchronous on the state kernels' chain (triton 3.6, sm_90; docs/kernels.md); dqdk_restructured (needs
    split_bwd) compiles the split dq/dk launch with _bwd_grads' DQDK_RESTRUCTURED block, which spills less at
    L = 128, D = 128 (offline, sm_90a); output_restructured compiles _fwd_output with its OUT_RESTRUCTURED
    block (fewer live L x L / L x BV fp32 tiles; spills less at L = 128, D = 128, offline, sm_90a);
    dden_prefetch compiles _bwd_states with the dden load outside its `if vb == 0` branch (masked), so the
    chunk loop's pipeliner prefetches it instead of waiting on it every step (offline TTGIR, sm_90a);
    dv_subtiles (needs split_bwd; applies from L = 32) compiles the split dv launch with _bwd_dv_subtiles: the
    chunk's three causal half-size sub-tiles instead of the L x L tile (on at L = 128, head dim 128: 2.314 ->
    2.268 ms at (1, 32, 16384, 128) and 8.919 -> 8.754 at 65536 from CUDA graphs, H200, eighteenth session);
    dqdk_subtiles the same for the split dq/dk launch (slower there: 2.268 -> 2.691 ms with both).
    doc_branch compiles _fwd_output and _bwd_grads with DOC_BRANCH: with documents, chunks without a document
    start run the one-document code (not timed yet; documents add ~7 % to those two kernels, H200).
    bwd_gates' BS is the block of positions per program (at least L; the tests shrink it to cross blocks), BC
    the chunk sums it reads per load to sum what is carried into the block.
    Counts: state_segments, the number of segments the state kernels' chunk chain is cut into (None: chosen per
    call from the programs and the card's SMs, _state_segments), and carry_block, the chunks per program of the
    carry passes (8: 4-16 timed alike on an H200, seventeenth session). The defaults are the measured
    configuration; _launch_overrides changes them for sweeps and tests."""
    for d in (DQK, DV):
        if d < 16 or d & (d - 1):
            raise ValueError(f"mlstm triton: head dims must be powers of two >= 16, got DQK={DQK}, DV={DV}")
    L = chunk_size or (128 if S >= 4096 and max(DQK, DV) <= 128 else 64)
    if L < 16 or L & (L - 1):
        raise ValueError(f"mlstm triton: chunk_size must be a power of two >= 16, got {L}")
    tile = state_block or 64
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"mlstm triton: state_block must be a power of two >= 16, got {tile}")
    BVO = min(128, DV)

    def launch(num_warps: int, **extra: int | None) -> dict:
        return dict(num_warps=num_warps, num_stages=3, **extra)

    # L = 128: the state kernels' chain pipelined (fp32 gates, _bwd_states 3 deep, dden prefetched) won at
    # every L = 128 shape of the twelfth session's launch sweep (H100): 2.66 -> 2.56, 10.29 -> 9.90 and
    # (2, 9, 16384, 64) 1.36 -> 1.23 ms. At head dim 128 also the split backward with its restructured dq/dk
    # block and the restructured output block: all together 2.66 -> 2.44 and 10.29 -> 9.45 ms; at head dim 64
    # those two blocks lost (docs/benchmarks.md, "Twelfth session").
    pipelined_states = L == 128
    long_128 = L == 128 and DV == 128
    # _bwd_gates: one program per block of a row, the blocks in parallel (eighteenth session; before, one program
    # walked each row, and its chain of steps took 24 us at (1, 32, 16384, 128), 41 with 8 documents, H200).
    # Blocks of 512 and 4 warps took 3.2 / 5.3 us there, 9.2 / 17.5 at 65536 (bench_gates.py, H200), the best or
    # within 0.3 us of it at each shape and document count.
    gates_block = min(512, max(16, next_power_of_2(S)))
    cfg = dict(L=L, BK=min(64, DQK), BV=min(64, DV), BVO=BVO, BKS=min(tile, DQK), BVS=min(tile, DV),
               PREC="ieee" if dtype == torch.float32 else "tf32", split_bwd=long_128,
               gates_fp32=pipelined_states, dqdk_restructured=long_128, output_restructured=long_128,
               dden_prefetch=pipelined_states, dv_subtiles=long_128, dqdk_subtiles=False, doc_branch=False,
               state_segments=None, carry_block=8,
               fwd_states=launch(4, NUM_STAGES=None), fwd_carry=launch(4),
               fwd_output=launch(8 if L * BVO > 4096 else 4), bwd_dden=launch(4),
               bwd_states=launch(4, NUM_STAGES=3 if pipelined_states else None), bwd_carry=launch(4),
               bwd_grads=launch(8), bwd_dqdk=launch(8), bwd_dv=launch(4 if long_128 else 8),
               bwd_chunk_sums=launch(4), bwd_gates=launch(4, BS=gates_block, BC=256))
    for key, value in _LAUNCH_OVERRIDES.items():
        if key in _FLAGS and isinstance(value, bool):
            cfg[key] = value
        elif key in _COUNTS and (isinstance(value, int) and not isinstance(value, bool) and value >= 1
                                 or value is None and key == "state_segments"):
            cfg[key] = value
        elif key in _KERNELS and isinstance(value, dict) and set(value) <= set(cfg[key]):
            cfg[key] = {**cfg[key], **value}
        else:
            raise ValueError(f"mlstm triton: unknown launch override {key}={value!r}")
    for flag in ("dqdk_restructured", "dv_subtiles", "dqdk_subtiles"):
        if cfg[flag] and not cfg["split_bwd"]:
            raise ValueError(f"mlstm triton: {flag} applies to the split backward only (split_bwd=True)")
    cfg["bwd_gates"]["BS"] = max(cfg["bwd_gates"]["BS"], L)  # whole chunks per block (overrides may go below L)
    return cfg


_default_config = functools.lru_cache(maxsize=256)(_launch_config)


MAX_SEGMENTS, MIN_SEGMENT_CHUNKS = 8, 4  # _state_segments' automatic choice


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _state_segments(requested: int | None, programs: int, NC: int, device: torch.device) -> tuple[int, int]:
    """(G, K): the state kernels' chunks cut into G segments of K chunks (the last may be shorter).

    The state kernels are a chain of NC dependent steps per program, and one step costs the latency of its whole
    body (docs/kernels.md), so with one or two programs per SM their time is NC step latencies, whatever the
    head count. Segments shorten the chain to K steps and multiply the programs by G; the carry passes then
    add, in parallel over chunks, what crosses the segment edges. `requested` (state_segments in _config) or,
    when None, on CUDA: the most segments (up to MAX_SEGMENTS) that keep the programs within two per SM, each
    segment at least MIN_SEGMENT_CHUNKS long; on CPU (the interpreter) one.

    Measured per-kernel on an H200 (132 SMs, seventeenth session, docs/kernels.md): with 128 programs ((1, 32,
    16384, 128)) G = 2 took the state kernels from 338 + 325 to 254 + 260 us plus 45 + 40 us of carry passes,
    while G = 4 cost 125 us per carry pass for 4 us less in the state kernels; with 18 programs ((2, 9, 16384,
    64)) G = 8 took the whole forward+backward from 1156 to 645 us (G = 16: 648); with 72 programs ((8, 9,
    4096, 64)) G = 2 was best (636 -> 616-621 us, G = 4: 621)."""
    if requested is None:
        requested = 1
        if device.type == "cuda":
            slots = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            while (requested < MAX_SEGMENTS and programs * requested * 2 <= slots
                   and NC >= 2 * requested * MIN_SEGMENT_CHUNKS):
                requested *= 2
    K = cdiv(NC, min(requested, NC))
    return cdiv(NC, K), K


class _MLSTMChunkwise(torch.autograd.Function):
    """Inputs: q, k (B,NH,S,DQK), v (B,NH,S,DV) contiguous of one dtype; igate, fgate (B,NH,S) contiguous;
    C0, n0, m0 fp32 or None (fresh); seg (B,S) int32/int64 segment ids, contiguous, or None (one document).
    Outputs h, and the final C, n, m only if with_state: autograd gives a returned but unused output a zero
    gradient, so a final state returned in training would cost three zero fills, zero terms in the gate
    gradients and _bwd_states' final-state path, all for nothing."""

    @staticmethod
    def forward(ctx, q, k, v, igate, fgate, C0, n0, m0, seg, eps, chunk_size, state_block, with_state):
        B, NH, S, DQK = q.shape
        DV = v.shape[-1]
        cfg = _config(S, DQK, DV, q.dtype, chunk_size, state_block)
        L, BKs, BVs = cfg["L"], cfg["BKS"], cfg["BVS"]
        NC = cdiv(S, L)
        dev = q.device
        ctx.gate_dtypes = igate.dtype, fgate.dtype
        if cfg["gates_fp32"]:  # the kernels upcast every gate at once, so this changes no result
            igate, fgate = igate.float(), fgate.float()
        flags = dict(PREC=cfg["PREC"], HAS_DOC=seg is not None)
        cs = torch.empty(B * NH, NC, DQK, DV, device=dev, dtype=q.dtype)
        ns = torch.empty(B * NH, NC, DQK, device=dev, dtype=torch.float32)
        ms = torch.empty(B * NH, NC + 1, device=dev, dtype=torch.float32)
        # Pointers of absent optional tensors (HAS_* False) are never read or written: any tensor stands in.
        final = (cs, ns, ms)
        if with_state:
            final = (torch.empty(B, NH, DQK, DV, device=dev, dtype=torch.float32),
                     torch.empty(B, NH, DQK, device=dev, dtype=torch.float32),
                     torch.empty(B, NH, device=dev, dtype=torch.float32))
        seg_arg = seg if seg is not None else ms
        init = (C0, n0, m0) if C0 is not None else (cs, ns, ms)
        tiles = (DQK // BKs) * (DV // BVs)
        G, K = _state_segments(cfg["state_segments"], B * NH * tiles, NC, dev)
        W = carry_width(G, NC, DQK, DV)
        # the segments' end states and decays; the backward reuses the buffer for its own
        carry = torch.empty(B * NH, W, device=dev, dtype=torch.float32) if G > 1 else ms
        _fwd_states[(B * NH, DQK // BKs, DV // BVs * G)](
            k, v, igate, fgate, seg_arg, *init, cs, ns, ms, *final, carry, NH, S, NC, K, G, W,
            DQK=DQK, DV=DV, L=L, BK=BKs, BV=BVs, HAS_INIT=C0 is not None, HAS_FINAL=with_state,
            SEGMENTED=G > 1, **cfg["fwd_states"], **flags)
        if G > 1:
            CB = cfg["carry_block"]
            _fwd_carry[((G - 1) * cdiv(K, CB), B * NH, tiles)](
                carry, cs, ns, ms, *final, NC, K, G, W, CB, DQK=DQK, DV=DV, BK=BKs, BV=BVs,
                HAS_FINAL=with_state, **cfg["fwd_carry"])
        h = torch.empty_like(v, dtype=q.dtype)
        den = torch.empty(B, NH, S, device=dev, dtype=torch.float32)
        mi = torch.empty(B, NH, S, device=dev, dtype=torch.float32)
        _fwd_output[(NC, B * NH, DV // cfg["BVO"])](
            q, k, v, igate, fgate, seg_arg, cs, ns, ms, h, den, mi, NH, S, NC, eps,
            DQK=DQK, DV=DV, L=L, BK=cfg["BK"], BV=cfg["BVO"], OUT_RESTRUCTURED=cfg["output_restructured"],
            DOC_BRANCH=cfg["doc_branch"], **cfg["fwd_output"], **flags)
        ctx.save_for_backward(q, k, v, igate, fgate, seg, cs, ns, ms, den, mi, h, *final[:2] if with_state else ())
        ctx.cfg, ctx.eps, ctx.has_init, ctx.with_state = cfg, eps, C0 is not None, with_state
        ctx.segments, ctx.carry = (G, K, W), carry
        if not with_state:
            return h
        ctx.mark_non_differentiable(final[2])
        return (h, *final)

    @staticmethod
    def backward(ctx, dh, dCf=None, dnf=None, _dmf=None):
        q, k, v, igate, fgate, seg, cs, ns, ms, den, mi, h, *final = ctx.saved_tensors  # final: (Cf, nf) or ()
        cfg, eps = ctx.cfg, ctx.eps
        L, BK, BV = cfg["L"], cfg["BK"], cfg["BV"]
        B, NH, S, DQK = q.shape
        DV = v.shape[-1]
        NC = ms.shape[1] - 1
        flags = dict(PREC=cfg["PREC"], HAS_DOC=seg is not None)
        dh = dh.to(q.dtype).contiguous()
        has_dfinal = ctx.with_state  # autograd passes zeros for returned outputs that are unused
        if has_dfinal:
            dCf, dnf = dCf.float().contiguous(), dnf.float().contiguous()
        dcs, dns, dden = torch.empty_like(cs), torch.empty_like(ns), torch.empty_like(den)
        dC0 = dn0 = None
        if ctx.has_init:
            dC0 = torch.empty(B, NH, DQK, DV, device=q.device, dtype=torch.float32)
            dn0 = torch.empty(B, NH, DQK, device=q.device, dtype=torch.float32)
        seg_arg = seg if seg is not None else ms  # stand-ins for absent optional tensors, never touched
        dfinal = (dCf, dnf) if has_dfinal else (dcs, dns)
        dinit = (dC0, dn0) if ctx.has_init else (dcs, dns)
        _bwd_dden[(cdiv(S, 64), B * NH)](h, dh, den, mi, dden, S, eps, DV=DV, BS=64, BV=BV, **cfg["bwd_dden"])
        (G, K, W), carry = ctx.segments, ctx.carry
        _bwd_states[(B * NH, DQK // cfg["BKS"], DV // cfg["BVS"] * G)](
            q, dh, igate, fgate, seg_arg, ms, den, mi, *dfinal, dcs, dns, *dinit, dden, carry, NH, S, NC, K, G, W,
            eps, DQK=DQK, DV=DV, L=L, BK=cfg["BKS"], BV=cfg["BVS"], HAS_INIT=ctx.has_init,
            HAS_DFINAL=has_dfinal, DDEN_PREFETCH=cfg["dden_prefetch"], SEGMENTED=G > 1, **cfg["bwd_states"],
            **flags)
        if G > 1:
            tiles = (DQK // cfg["BKS"]) * (DV // cfg["BVS"])
            CB = cfg["carry_block"]
            _bwd_carry[((G - 1) * cdiv(K, CB), B * NH, tiles)](
                carry, dcs, dns, *dinit, NC, K, G, W, CB, DQK=DQK, DV=DV, BK=cfg["BKS"], BV=cfg["BVS"],
                HAS_INIT=ctx.has_init, **cfg["bwd_carry"])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qdq, kdk = torch.empty_like(den), torch.empty_like(den)
        args = (q, k, v, dh, igate, fgate, seg_arg, cs, ns, ms, den, mi, dden, dcs, dns, dq, dk, dv, qdq, kdk,
                NH, S, NC, eps)
        split = [(True, False, "bwd_dqdk"), (False, True, "bwd_dv")]
        for do_dqdk, do_dv, launch in split if cfg["split_bwd"] else [(True, True, "bwd_grads")]:
            _bwd_grads[(NC, B * NH)](*args, DQK=DQK, DV=DV, L=L, BK=BK, BV=BV, DO_DQDK=do_dqdk, DO_DV=do_dv,
                                     DQDK_RESTRUCTURED=cfg["dqdk_restructured"] and not do_dv,
                                     DV_SUBTILES=cfg["dv_subtiles"] and not do_dqdk and L >= 32,
                                     DQDK_SUBTILES=cfg["dqdk_subtiles"] and not do_dv and L >= 32,
                                     DOC_BRANCH=cfg["doc_branch"], **cfg[launch], **flags)
        d_final = den  # (unread without a final state)
        if has_dfinal:
            Cf, nf = final
            d_final = ((dCf * Cf).sum((-1, -2)) + (dnf * nf).sum(-1)).contiguous()
        ig_dtype, fg_dtype = ctx.gate_dtypes
        dig = torch.empty(B, NH, S, device=q.device, dtype=ig_dtype)
        dfg = torch.empty(B, NH, S, device=q.device, dtype=fg_dtype)
        dbc = torch.empty(B * NH, NC, 2, device=q.device, dtype=torch.float32)
        _bwd_chunk_sums[(NC, B * NH)](qdq, kdk, seg_arg, dbc, NH, S, NC, L=L, HAS_DOC=seg is not None,
                                      **cfg["bwd_chunk_sums"])
        _bwd_gates[(cdiv(S, cfg["bwd_gates"]["BS"]), B * NH)](
            qdq, kdk, dbc, fgate, seg_arg, d_final, dig, dfg, NH, S, NC, L=L, HAS_DOC=seg is not None,
            HAS_DFINAL=has_dfinal, **cfg["bwd_gates"])
        return dq, dk, dv, dig, dfg, dC0, dn0, None, None, None, None, None, None


# Inside torch.compile (compile_blocks in training) the split backward's set (L = 128, head dim 128: split_bwd with
# both restructured blocks) runs eagerly behind a graph break. Compiled, it failed on GPUs: its test failed on an
# H200 (2026-11-28, only the summary came back), and with its backward fused instead, inductor's scheduler raised
# KeyError in compute_ancestors (torch 2.11, H100, 2026-11-28; packed documents). That fused set also ran
# slower in the compiled mixer than the eager mixer with the split (H100: 6.88 vs 6.18 ms at (1, 32, 16384, 128),
# 26.79 vs 24.12 ms at 65536), and at S >= 8192 the host's time per call is well below the GPU's, so eager
# kernels lose nothing there. At S = 4096 (L = 128 since the fifteenth session) the call alone is host-bound
# (~1.0 ms of host per call against 0.67 ms of kernels, H100); a compiled training step with this graph break
# at 4096 has not been timed. Every other set compiles and matched eager (tests/kernels, GPU).
_apply_eager = torch.compiler.disable(_MLSTMChunkwise.apply)


def mlstm_triton(
    q: Tensor,  # (B, NH, S, DQK)
    k: Tensor,  # (B, NH, S, DQK)
    v: Tensor,  # (B, NH, S, DV)
    igate: Tensor,  # (B, NH, S)
    fgate: Tensor,  # (B, NH, S)
    *,
    segment_ids: Tensor | None = None,  # (B, S)
    initial_state: MLSTMState | None = None,
    chunk_size: int | None = None,
    state_block: int | None = None,
    eps: float = 1e-6,
    return_final_state: bool = True,
) -> tuple[Tensor, MLSTMState | None]:
    """Chunkwise Triton mLSTM: h (B,NH,S,DV) in q's dtype (bf16/fp16/fp32) and the final fp32 state (None unless
    ``return_final_state``: training leaves it out, so its backward does no work for it).

    Semantics as reference.mlstm_chunkwise; backward: m constant, everything else (n included) exact."""
    B, NH, S, _ = q.shape
    gates_ok = igate.shape == (B, NH, S) and fgate.shape == (B, NH, S)
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or not gates_ok:
        raise ValueError(f"mlstm triton: bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"igate {tuple(igate.shape)} fgate {tuple(fgate.shape)}")
    k, v = k.to(q.dtype), v.to(q.dtype)
    seg = None
    if segment_ids is not None:
        check_segment_ids(segment_ids, B, S)
        # the kernels find the document starts themselves (ids differing from the previous position's); other
        # dtypes go through their document index, whose steps are the same starts
        seg = segment_ids if segment_ids.dtype in (torch.int32, torch.int64) else \
            document_index(segment_ids, B, S, q.device).to(torch.int32)
        seg = seg.to(q.device).contiguous()
    C0 = n0 = m0 = None
    if initial_state is not None:
        C0, n0, m0 = (x.float().contiguous() for x in initial_state)
        m0 = m0.detach()
    apply = _MLSTMChunkwise.apply
    if torch.compiler.is_compiling() and _config(S, q.shape[-1], v.shape[-1], q.dtype, chunk_size,
                                                 state_block)["split_bwd"]:
        apply = _apply_eager
    out = apply(q.contiguous(), k.contiguous(), v.contiguous(), igate.contiguous(), fgate.contiguous(), C0, n0, m0,
                seg, eps, chunk_size, state_block, return_final_state)
    return (out[0], out[1:]) if return_final_state else (out, None)
