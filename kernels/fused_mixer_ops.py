"""Fused Triton kernels for the hybrid mixer's small per-position operations, forward and backward.

The plain torch form of these operations (lit_xdistill.models.mixer, the reference) launches one kernel per
elementwise op, per cast and per GQA repeat; here each is one kernel forward and one backward:

  feature_map      phi(x) = [softmax(x W_h), softmax(-x W_h)] per head h (or softmax(x W_h) alone), fp32 in
                   registers, input dtype in and out; query head h reads input head h // (NH // NX), so GQA
                   keys are never repeated. The backward recomputes x W_h (cheaper than storing it) and
                   reduces the weight gradient over a few row splits per head (deterministic, no atomics).
  gate_activations the gate projection's output g (B, S, G*NH) -> soft-capped input and forget gate
                   pre-activations and the sigmoid output gate, each (B, NH, S) fp32 contiguous as the mLSTM
                   kernels read them.
  gate_mix         o * h + (1 - o) * swa in fp32, written in the (B, S, NH, D) layout that o_proj reads.

Each matches its torch form up to rounding (the feature map keeps x W_h in fp32 where torch rounds it to the
input dtype first). tests/kernels/test_fused_mixer_ops.py checks outputs and gradients against torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import CompiledLaunch, cdiv, next_power_of_2

__all__ = ["feature_map", "gate_activations", "gate_mix"]


# -- feature map ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_rows(z, valid):
    """Row softmax of an fp32 tile over the columns where `valid` (padding columns get 0)."""
    z = tl.where(valid, z, float("-inf"))
    e = tl.exp(z - tl.max(z, 1)[:, None])
    return e / tl.sum(e, 1)[:, None]


@CompiledLaunch
@triton.jit
def _phi_fwd(
    x_ptr,  # (B, NX, S, D), strides sx*
    w_ptr,  # (NH, D, F) contiguous
    y_ptr,  # (B, NH, S, FT) contiguous, FT = 2F (PM) or F, x's dtype
    S, NH, REP, D, F,
    sxb, sxh, sxs, sxd,
    PM: tl.constexpr, FT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    PREC: tl.constexpr,
):
    blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // NH, bh % NH
    rows = blk * BS + tl.arange(0, BS)
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    x = tl.load(x_ptr + b * sxb + (h // REP) * sxh + rows[:, None] * sxs + od[None, :] * sxd,
                mask=(rows[:, None] < S) & (od[None, :] < D), other=0.0)
    w = tl.load(w_ptr + h * D * F + od[:, None] * F + of[None, :], mask=(od[:, None] < D) & (of[None, :] < F),
                other=0.0)
    z = tl.dot(x, w.to(x.dtype), input_precision=PREC)  # (BS, BF) fp32
    cols = of[None, :] < F
    out = y_ptr + (bh * S + rows[:, None]) * FT + of[None, :]
    keep = (rows[:, None] < S) & cols
    tl.store(out, _softmax_rows(z, cols).to(y_ptr.dtype.element_ty), mask=keep)
    if PM:
        tl.store(out + F, _softmax_rows(-z, cols).to(y_ptr.dtype.element_ty), mask=keep)


@CompiledLaunch
@triton.jit
def _phi_bwd(
    x_ptr, w_ptr,  # as in _phi_fwd
    dy_ptr,  # (B, NH, S, FT) contiguous gradient of the output
    dx_ptr,  # (B, NH, S, D) contiguous, x's dtype: gradient per query head (summed over GQA groups outside)
    dw_ptr,  # (NSPLIT, B, NH, D, F) fp32: weight gradient of each program's rows
    S, NH, REP, D, F, BLOCKS,  # BLOCKS: row blocks per split
    sxb, sxh, sxs, sxd,
    PM: tl.constexpr, FT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
    PREC: tl.constexpr,
):
    """dz = softmax'(z) dy (minus the same for -z), dx = dz W^T, dW = x^T dz, with z = x W recomputed."""
    split, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // NH, bh % NH
    od, of = tl.arange(0, BD), tl.arange(0, BF)
    cols = of[None, :] < F
    w = tl.load(w_ptr + h * D * F + od[:, None] * F + of[None, :], mask=(od[:, None] < D) & (of[None, :] < F),
                other=0.0)
    dw = tl.zeros((BD, BF), dtype=tl.float32)
    for i in range(BLOCKS):
        rows = (split * BLOCKS + i) * BS + tl.arange(0, BS)
        x = tl.load(x_ptr + b * sxb + (h // REP) * sxh + rows[:, None] * sxs + od[None, :] * sxd,
                    mask=(rows[:, None] < S) & (od[None, :] < D), other=0.0)
        wc = w.to(x.dtype)
        z = tl.dot(x, wc, input_precision=PREC)
        keep = (rows[:, None] < S) & cols
        grad = dy_ptr + (bh * S + rows[:, None]) * FT + of[None, :]
        p = _softmax_rows(z, cols)
        dy = tl.load(grad, mask=keep, other=0.0).to(tl.float32)
        dz = p * (dy - tl.sum(dy * p, 1)[:, None])
        if PM:
            p = _softmax_rows(-z, cols)
            dy = tl.load(grad + F, mask=keep, other=0.0).to(tl.float32)
            dz -= p * (dy - tl.sum(dy * p, 1)[:, None])
        dz = dz.to(x.dtype)
        dx = tl.dot(dz, tl.trans(wc), input_precision=PREC)
        tl.store(dx_ptr + (bh * S + rows[:, None]) * D + od[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(rows[:, None] < S) & (od[None, :] < D))
        dw += tl.dot(tl.trans(x), dz, input_precision=PREC)
    tl.store(dw_ptr + ((split * tl.num_programs(1) + bh) * D + od[:, None]) * F + of[None, :], dw,
             mask=(od[:, None] < D) & (of[None, :] < F))


def _pow2(n: int) -> int:
    """Smallest power of two >= max(n, 16) (tl.dot needs tiles of at least 16)."""
    return max(16, next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot precision: exact fp32 products for fp32/fp64 inputs (half-precision inputs ignore it)."""
    return "tf32" if dtype in (torch.bfloat16, torch.float16) else "ieee"


def _target_programs(device: torch.device) -> int:
    """How many programs the weight-gradient reduction aims for: 4 per SM on CUDA; a handful in the CPU
    interpreter (enough that tests cover several splits)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class _FeatureMap(torch.autograd.Function):
    """x (B, NX, S, D), weight (NH, D, F) with NX | NH -> (B, NH, S, 2F or F) in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, pm: bool) -> Tensor:
        B, NX, S, D = x.shape
        NH, _, F = weight.shape
        weight = weight.contiguous()
        BD, BF = _pow2(D), _pow2(F)
        # The backward keeps the weight tile and its gradient in registers: for head dims above 64, fewer rows
        # per block over more warps (ptxas, sm_90: no spills up to D = 128; D = 256 spills)
        BS, warps = (64, 4) if BD * BF <= 64 * 32 else (32, 8)
        y = torch.empty(B, NH, S, 2 * F if pm else F, device=x.device, dtype=x.dtype)
        _phi_fwd[(cdiv(S, BS), B * NH)](
            x, weight, y, S, NH, NH // NX, D, F, *x.stride(),
            PM=pm, FT=y.shape[-1], BS=BS, BD=BD, BF=BF, PREC=_precision(x.dtype), num_warps=warps)
        ctx.save_for_backward(x, weight)
        ctx.pm, ctx.tiles = pm, (BS, BD, BF, warps)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        B, NX, S, D = x.shape
        NH, _, F = weight.shape
        BS, BD, BF, warps = ctx.tiles
        n_blocks = cdiv(S, BS)
        splits = min(n_blocks, cdiv(_target_programs(x.device), B * NH))
        blocks = cdiv(n_blocks, splits)
        splits = cdiv(n_blocks, blocks)
        dx = torch.empty(B, NH, S, D, device=x.device, dtype=x.dtype)
        dw = torch.empty(splits, B, NH, D, F, device=x.device, dtype=torch.float32)
        _phi_bwd[(splits, B * NH)](
            x, weight, dy.contiguous(), dx, dw, S, NH, NH // NX, D, F, blocks, *x.stride(),
            PM=ctx.pm, FT=dy.shape[-1], BS=BS, BD=BD, BF=BF, PREC=_precision(x.dtype), num_warps=warps)
        if NX != NH:  # the query heads sharing an input head add up, as a repeat_interleave's backward does
            dx = dx.view(B, NX, NH // NX, S, D).sum(2)
        return dx, dw.sum((0, 1)).to(weight.dtype), None


def feature_map(x: Tensor, weight: Tensor, *, pm: bool = True) -> Tensor:
    """phi(x) per head, fused: [softmax(x W_h), softmax(-x W_h)] if pm else softmax(x W_h).

    x: (B, NX, S, D) in any layout, NX dividing NH; query head h reads input head h // (NH // NX) (GQA keys
    without a repeat). weight: (NH, D, F), cast to x's dtype for the product as the torch form does.
    Returns (B, NH, S, 2F or F) contiguous in x's dtype; the softmax runs in fp32. Differentiable in x and
    weight (the weight gradient comes back in the weight's dtype)."""
    B, NX, S, D = x.shape
    if weight.dim() != 3 or weight.shape[1] != D or weight.shape[0] % NX:
        raise ValueError(f"feature_map: x {tuple(x.shape)} needs weight (NH, D, F) with NX | NH; "
                         f"got {tuple(weight.shape)}")
    return _FeatureMap.apply(x, weight, pm)


# -- gates -----------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(y):
    t = tl.exp(-2.0 * tl.abs(y))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(y >= 0, r, -r)


@CompiledLaunch
@triton.jit
def _gates_fwd(
    g_ptr,  # (B, S, G * NH), strides sg*
    ig_ptr, fg_ptr, o_ptr,  # (B, NH, S) fp32 outputs (o only if HAS_O)
    S, NH, cap,
    sgb, sgs, sgc,
    HAS_O: tl.constexpr, CAP: tl.constexpr, BS: tl.constexpr, BH: tl.constexpr,
):
    blk, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    # torch.compile (inductor) passes Python floats to Triton kernels as fp64, which would promote this kernel's
    # arithmetic to fp64 (and fail tl.dot's fp32 accumulator check); plain launches pass fp32
    cap = tl.cast(cap, tl.float32)
    s = blk * BS + tl.arange(0, BS)[:, None]
    hh = tl.arange(0, BH)[None, :]
    keep = (s < S) & (hh < NH)
    src = g_ptr + b * sgb + s * sgs + hh * sgc
    dst = (b * NH + hh) * S + s
    gi = tl.load(src, mask=keep, other=0.0).to(tl.float32)
    gf = tl.load(src + NH * sgc, mask=keep, other=0.0).to(tl.float32)
    if CAP:
        gi = cap * _tanh(gi / cap)
        gf = cap * _tanh(gf / cap)
    tl.store(ig_ptr + dst, gi, mask=keep)
    tl.store(fg_ptr + dst, gf, mask=keep)
    if HAS_O:
        go = tl.load(src + 2 * NH * sgc, mask=keep, other=0.0).to(tl.float32)
        tl.store(o_ptr + dst, 1.0 / (1.0 + tl.exp(-go)), mask=keep)


@CompiledLaunch
@triton.jit
def _gates_bwd(
    g_ptr,  # as in _gates_fwd
    dig_ptr, dfg_ptr, do_ptr,  # (B, NH, S) gradients of the outputs (do only if HAS_O)
    dg_ptr,  # (B, S, G * NH) contiguous, g's dtype
    S, NH, cap,
    sgb, sgs, sgc,
    HAS_O: tl.constexpr, CAP: tl.constexpr, BS: tl.constexpr, BH: tl.constexpr,
):
    blk, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    cap = tl.cast(cap, tl.float32)  # as in _gates_fwd
    G: tl.constexpr = 3 if HAS_O else 2
    s = blk * BS + tl.arange(0, BS)[:, None]
    hh = tl.arange(0, BH)[None, :]
    keep = (s < S) & (hh < NH)
    src = g_ptr + b * sgb + s * sgs + hh * sgc
    grad = (b * NH + hh) * S + s
    dst = dg_ptr + (b * S + s) * (G * NH) + hh
    dgi = tl.load(dig_ptr + grad, mask=keep, other=0.0)
    dgf = tl.load(dfg_ptr + grad, mask=keep, other=0.0)
    if CAP:  # d/dx c tanh(x / c) = 1 - tanh(x / c)^2
        ti = _tanh(tl.load(src, mask=keep, other=0.0).to(tl.float32) / cap)
        tf = _tanh(tl.load(src + NH * sgc, mask=keep, other=0.0).to(tl.float32) / cap)
        dgi = dgi * (1.0 - ti * ti)
        dgf = dgf * (1.0 - tf * tf)
    tl.store(dst, dgi.to(dg_ptr.dtype.element_ty), mask=keep)
    tl.store(dst + NH, dgf.to(dg_ptr.dtype.element_ty), mask=keep)
    if HAS_O:
        o = 1.0 / (1.0 + tl.exp(-tl.load(src + 2 * NH * sgc, mask=keep, other=0.0).to(tl.float32)))
        do = tl.load(do_ptr + grad, mask=keep, other=0.0)
        tl.store(dst + 2 * NH, (do * o * (1.0 - o)).to(dg_ptr.dtype.element_ty), mask=keep)


_GATE_ROWS = 32


class _GateActivations(torch.autograd.Function):
    """g (B, S, G * NH), G = 2 or 3 -> igate, fgate (and o if G = 3), each (B, NH, S) fp32."""

    @staticmethod
    def forward(ctx, g: Tensor, num_heads: int, cap: float):
        B, S, width = g.shape
        has_o = width == 3 * num_heads
        ig, fg = (torch.empty(B, num_heads, S, device=g.device, dtype=torch.float32) for _ in range(2))
        o = torch.empty_like(ig) if has_o else ig  # stand-in pointer when absent, never written
        grid = (cdiv(S, _GATE_ROWS), B)
        _gates_fwd[grid](g, ig, fg, o, S, num_heads, float(cap), *g.stride(), HAS_O=has_o, CAP=cap > 0,
                         BS=_GATE_ROWS, BH=next_power_of_2(num_heads), num_warps=4)
        ctx.save_for_backward(g)
        ctx.num_heads, ctx.cap, ctx.has_o = num_heads, cap, has_o
        return (ig, fg, o) if has_o else (ig, fg)

    @staticmethod
    def backward(ctx, dig: Tensor, dfg: Tensor, *do: Tensor):
        (g,) = ctx.saved_tensors
        B, S, width = g.shape
        num_heads, cap = ctx.num_heads, ctx.cap
        dg = torch.empty(B, S, width, device=g.device, dtype=g.dtype)
        dig, dfg = dig.float().contiguous(), dfg.float().contiguous()
        do_arg = do[0].float().contiguous() if ctx.has_o else dig  # stand-in when absent, never read
        grid = (cdiv(S, _GATE_ROWS), B)
        _gates_bwd[grid](g, dig, dfg, do_arg, dg, S, num_heads, float(cap), *g.stride(), HAS_O=ctx.has_o,
                         CAP=cap > 0, BS=_GATE_ROWS, BH=next_power_of_2(num_heads), num_warps=4)
        return dg, None, None


def gate_activations(g: Tensor, num_heads: int, cap: float) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gate pre-activations from the gate projection's output, fused.

    g: (B, S, G * NH) with G = 2 ([input, forget]) or 3 ([input, forget, output]) blocks of NH columns.
    Returns igate, fgate = cap * tanh(g / cap) (no cap if cap <= 0) and o = sigmoid(g) (None if G = 2), each
    (B, NH, S) fp32 contiguous. Differentiable in g."""
    if g.dim() != 3 or g.shape[-1] not in (2 * num_heads, 3 * num_heads):
        raise ValueError(f"gate_activations: g must be (B, S, 2 or 3 x {num_heads}), got {tuple(g.shape)}")
    out = _GateActivations.apply(g, num_heads, cap)
    return (*out, None) if len(out) == 2 else out


# -- output mix ------------------------------------------------------------------------------------------------
@triton.jit
def _mix_tile(o_ptr, h_ptr, a_ptr, S, NH, D, sh0, sh1, sh2, sh3, sa0, sa1, sa2, sa3,
              BS: tl.constexpr, BD: tl.constexpr):
    """This program's (BS, BD) tile of one (batch, head): its coordinates and o, h, a in fp32."""
    blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, hd = bh // NH, bh % NH
    s = blk * BS + tl.arange(0, BS)
    d = tl.arange(0, BD)[None, :]
    keep = (s[:, None] < S) & (d < D)
    o = tl.load(o_ptr + bh * S + s, mask=s < S, other=0.0)[:, None]
    h = tl.load(h_ptr + b * sh0 + hd * sh1 + s[:, None] * sh2 + d * sh3, mask=keep, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + b * sa0 + hd * sa1 + s[:, None] * sa2 + d * sa3, mask=keep, other=0.0).to(tl.float32)
    return b, hd, bh, s, d, keep, o, h, a


@CompiledLaunch
@triton.jit
def _mix_fwd(
    o_ptr,  # (B, NH, S) fp32 contiguous
    h_ptr, a_ptr, out_ptr,  # (B, NH, S, D) each, strides sh*, sa*, so*
    S, NH, D,
    sh0, sh1, sh2, sh3, sa0, sa1, sa2, sa3, so0, so1, so2, so3,
    BS: tl.constexpr, BD: tl.constexpr,
):
    b, hd, bh, s, d, keep, o, h, a = _mix_tile(o_ptr, h_ptr, a_ptr, S, NH, D, sh0, sh1, sh2, sh3,
                                               sa0, sa1, sa2, sa3, BS, BD)
    out = o * h + (1.0 - o) * a
    tl.store(out_ptr + b * so0 + hd * so1 + s[:, None] * so2 + d * so3, out.to(out_ptr.dtype.element_ty),
             mask=keep)


@CompiledLaunch
@triton.jit
def _mix_bwd(
    o_ptr, h_ptr, a_ptr,  # as in _mix_fwd
    dout_ptr,  # (B, NH, S, D), strides sd*
    dh_ptr, da_ptr,  # (B, NH, S, D) contiguous, in h's and a's dtypes
    do_ptr,  # (B, NH, S) fp32
    S, NH, D,
    sh0, sh1, sh2, sh3, sa0, sa1, sa2, sa3, sd0, sd1, sd2, sd3,
    BS: tl.constexpr, BD: tl.constexpr,
):
    b, hd, bh, s, d, keep, o, h, a = _mix_tile(o_ptr, h_ptr, a_ptr, S, NH, D, sh0, sh1, sh2, sh3,
                                               sa0, sa1, sa2, sa3, BS, BD)
    g = tl.load(dout_ptr + b * sd0 + hd * sd1 + s[:, None] * sd2 + d * sd3, mask=keep, other=0.0)
    g = g.to(tl.float32)
    dst = (bh * S + s[:, None]) * D + d
    tl.store(dh_ptr + dst, (o * g).to(dh_ptr.dtype.element_ty), mask=keep)
    tl.store(da_ptr + dst, ((1.0 - o) * g).to(da_ptr.dtype.element_ty), mask=keep)
    tl.store(do_ptr + bh * S + s, tl.sum(g * (h - a), 1), mask=s < S)


class _GateMix(torch.autograd.Function):
    """o (B, NH, S) fp32, h, swa (B, NH, S, D) -> o * h + (1 - o) * swa in h's dtype."""

    @staticmethod
    def forward(ctx, o: Tensor, h: Tensor, swa: Tensor) -> Tensor:
        B, NH, S, D = h.shape
        o = o.float().contiguous()
        out = torch.empty(B, S, NH, D, device=h.device, dtype=h.dtype).transpose(1, 2)
        BD = next_power_of_2(D)
        BS = max(1, 4096 // BD)
        _mix_fwd[(cdiv(S, BS), B * NH)](o, h, swa, out, S, NH, D, *h.stride(), *swa.stride(),
                                        *out.stride(), BS=BS, BD=BD, num_warps=4)
        ctx.save_for_backward(o, h, swa)
        ctx.tiles = (BS, BD)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        o, h, swa = ctx.saved_tensors
        B, NH, S, D = h.shape
        BS, BD = ctx.tiles
        dh = torch.empty(B, NH, S, D, device=h.device, dtype=h.dtype)
        dswa = torch.empty(B, NH, S, D, device=h.device, dtype=swa.dtype)
        do = torch.empty_like(o)
        _mix_bwd[(cdiv(S, BS), B * NH)](o, h, swa, dout, dh, dswa, do, S, NH, D, *h.stride(),
                                        *swa.stride(), *dout.stride(), BS=BS, BD=BD, num_warps=4)
        return do, dh, dswa


def gate_mix(o: Tensor, h: Tensor, swa: Tensor) -> Tensor:
    """The hybrid mixer's output o * h + (1 - o) * swa, fused, in fp32 arithmetic.

    o: (B, NH, S) output gate in [0, 1]; h (mLSTM branch) and swa (attention branch): (B, NH, S, D) in any
    layout. Returns (B, NH, S, D) in h's dtype as a view of a (B, S, NH, D) contiguous buffer, so the
    attention function's transpose back to (B, S, NH, D) copies nothing. Differentiable in o, h and swa."""
    if h.shape != swa.shape or o.shape != h.shape[:3]:
        raise ValueError(f"gate_mix: needs o (B, NH, S), h and swa (B, NH, S, D); got o {tuple(o.shape)}, "
                         f"h {tuple(h.shape)}, swa {tuple(swa.shape)}")
    return _GateMix.apply(o, h, swa)
