"""The hybrid mixer that replaces each softmax attention of the teacher.

How it plugs in: the teacher's own attention module (transformers' modeling code) still computes q, k, v
with its projections, q/k norms, RoPE and GQA layout, then calls the attention *function* named by
``config._attn_implementation``. We register ``"xdistill"`` as such a function; it forwards to the
``HybridMixer`` attached to that attention module, and the module applies o_proj to the result. So every
family transformers supports is converted without re-implementing it, and the copied weights keep their
names (``...self_attn.q_proj.weight``). A forward pre-hook hands the mixer the layer input x_t, which the
gates read.

Open choices of the method (METHOD.md), decided here:
- gates: i~, f~ and the output gate o~ come from one projection of x_t (``gates``, 3 scalars per head).
  The paper's o-gate reads [q; k; v]; since q, k, v are linear in x_t this folded form is a superset
  of it and what the paper suggests for inference. Pre-activations of i and f are soft-capped at 15.
- init: gate weights start at zero, so every gate starts at its bias: input-gate bias +4 (exp(4)*phi(q).phi(k)
  exceeds 1 already at a document's first token, so the normaliser rather than its lower bound is active
  and the branch starts as normalised linear attention); forget-gate biases spread over 3..6 across heads
  (memory horizons of ~20 to ~400 tokens); output-gate bias -4, so o = 0.018 and the untrained student is
  the sliding-window-plus-sinks branch, which equals the teacher exactly on documents shorter than W.
- feature maps: [softmax(x W), softmax(-x W)] per head (Hedgehog), total width = head dim so the kernels
  see DQK = head dim; W starts as a random orthogonal slice scaled by d^-1/4 (the square root of
  softmax attention's 1/sqrt(d) temperature, split between q and k). No extra 1/sqrt(d) on q:
  softmax features already have unit mass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .cache import HybridCache, LayerCache, slot_positions
from .configuration_xdistill import XDistillConfig
from .decoding import StaticLayerCache, step_attention

__all__ = [
    "ATTENTION_NAME", "HybridMixer", "MixerContext", "align_context", "attach_align_recorder", "attach_mixer",
    "head_layout", "register_attention_function",
]

ATTENTION_NAME = "xdistill"


@dataclass
class MixerContext:
    """What one forward pass tells every mixer (passed through transformers' kwargs)."""

    segment_ids: Tensor | None = None  # (B, S) document ids; None: one document per row
    cache: HybridCache | None = None  # decoding state, None when training
    continuing: bool = False  # the cache already holds tokens (decoding, chunked prefill): a plain flag rather
    # than cache.is_empty, whose token count changes every step and would make a compiled step recompile
    align: bool = False  # stage I: return the teacher output, record the student's MSE against it
    align_losses: dict[int, Tensor] = field(default_factory=dict)  # layer -> MSE (filled when align)
    # stage I: the MSE of the block running now, under one fixed name; a forward hook of the block
    # (attach_align_recorder) files it under the block's layer in align_losses (HybridMixer.forward says why)
    pending_align_loss: Tensor | None = None
    # Shared by the layers of one pass, so that the host issues their ops once per pass rather than once per layer
    # (short prompts are host-bound): the dense attention masks (xdistill_kernels.attention's mask_cache; eager
    # only) and, for a fresh prompt with a cache, the length (B,) of each row's last document (set by the model)
    # and the cache-fill gather plans per (prompt length, ring, sinks), filled by the first layer that needs them.
    mask_cache: dict = field(default_factory=dict)
    prompt_doc_len: Tensor | None = None
    fill_plans: dict = field(default_factory=dict)


class FeatureMap(nn.Module):
    """Per-head learned softmax feature map phi: (B, NX, S, D) -> (B, NH, S, F), NX | NH.

    Head h reads input head h // (NH // NX), so GQA keys go in with their NKV heads unrepeated."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, kind: str):
        super().__init__()
        self.kind = kind
        width = feature_dim // 2 if kind == "softmax_pm" else feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        num_heads, head_dim, width = self.weight.shape
        g = torch.Generator().manual_seed(0)
        for h in range(num_heads):  # QR in fp32 on the CPU whatever the default dtype (no bf16 QR kernel)
            sample = torch.randn(head_dim, max(head_dim, width), generator=g, device="cpu", dtype=torch.float32)
            q, _ = torch.linalg.qr(sample)
            with torch.no_grad():
                self.weight[h].copy_(q[:, :width] * head_dim**-0.25)

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        """phi(x) in x's dtype, softmax in fp32; ``fused``: one Triton kernel (``xdistill_kernels.feature_map``)
        instead of the torch ops below (the reference), which repeat GQA heads and round x W to x's dtype."""
        if fused:
            import xdistill_kernels as xk

            return xk.feature_map(x, self.weight, pm=self.kind == "softmax_pm")
        x = repeat_kv(x, self.weight.shape[0] // x.shape[1])
        proj = torch.einsum("bhsd,hdf->bhsf", x, self.weight.to(x.dtype)).float()
        if self.kind == "softmax_pm":
            return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1).to(x.dtype)
        return proj.softmax(-1).to(x.dtype)


def _softcap(x: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(x / cap) if cap > 0 else x


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, NKV, S, D) -> (B, NKV * n_rep, S, D): GQA keys/values for every query head."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class HybridMixer(nn.Module):
    """mLSTM + sliding-window attention with sinks, mixed per head, for one layer.

    Args:
        config: the student config (window, sinks, feature map, gate inits, backends).
        kind: this layer's mixer kind (see ``XDistillConfig.mixer``).
        hidden_size: the layer input width (gates read x_t).
        num_heads: query heads NH.
        head_dim: head dimension D.
        layer_idx: index of the decoder layer (keys the cache and alignment losses).
    """

    def __init__(self, config: XDistillConfig, kind: str, hidden_size: int, num_heads: int, head_dim: int,
                 layer_idx: int):
        super().__init__()
        self.kind, self.layer_idx, self.num_heads, self.head_dim = kind, layer_idx, num_heads, head_dim
        self.window, self.n_sinks, self.softcap = config.window, config.n_sinks, config.gate_softcap
        self.mlstm_backend, self.attention_backend = config.mlstm_backend, config.attention_backend
        self.pointwise_backend = config.pointwise_backend
        self._inits = (config.igate_bias, config.fgate_bias_range, config.ogate_bias)
        if kind in ("hybrid", "mlstm", "linear"):
            feature_dim = config.feature_dim or head_dim
            self.phi_q = FeatureMap(num_heads, head_dim, feature_dim, config.feature_map)
            self.phi_k = FeatureMap(num_heads, head_dim, feature_dim, config.feature_map)
        if kind in ("hybrid", "mlstm"):
            # [input, forget, output] gate pre-activations, one scalar per head each
            self.gates = nn.Linear(hidden_size, 3 * num_heads if kind == "hybrid" else 2 * num_heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as documented in the module docstring."""
        if hasattr(self, "phi_q"):
            self.phi_q.reset_parameters()
            self.phi_k.reset_parameters()
        if hasattr(self, "gates"):
            igate, (f_lo, f_hi), ogate = self._inits
            nh = self.num_heads
            with torch.no_grad():
                self.gates.weight.zero_()
                self.gates.bias[:nh] = igate
                self.gates.bias[nh : 2 * nh] = torch.linspace(f_lo, f_hi, nh)
                if self.kind == "hybrid":
                    self.gates.bias[2 * nh :] = ogate

    # -- branches ----------------------------------------------------------------------------------
    def _fused(self, x: Tensor) -> bool:
        """Whether the feature maps, gate activations and output mix run fused (``pointwise_backend``)."""
        return self.pointwise_backend == "triton" or (self.pointwise_backend == "auto" and x.is_cuda)

    def _gate_preacts(self, x: Tensor, fused: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """x (B, S, hidden) -> igate, fgate (B, NH, S) fp32 soft-capped, o (B, NH, S) fp32 or None."""
        if fused:
            import xdistill_kernels as xk

            return xk.gate_activations(self.gates(x), self.num_heads, self.softcap)
        g = self.gates(x).float().transpose(1, 2)  # (B, 2|3 * NH, S)
        nh = self.num_heads
        igate, fgate = _softcap(g[:, :nh], self.softcap), _softcap(g[:, nh : 2 * nh], self.softcap)
        o = torch.sigmoid(g[:, 2 * nh :]) if self.kind == "hybrid" else None
        return igate, fgate, o

    def _mlstm_fresh(self, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
                     segment_ids: Tensor | None, fused: bool) -> Tensor:
        """The mLSTM branch without a cache (training); k, v (B, NKV, S, D): the key feature map reads the GQA
        heads itself, so only v is repeated."""
        import xdistill_kernels as xk

        fq, fk, vr = self.phi_q(q, fused), self.phi_k(k, fused), repeat_kv(v, q.shape[1] // v.shape[1])
        return xk.mlstm(fq, fk, vr, igate, fgate, segment_ids=segment_ids, backend=self.mlstm_backend)

    def _mlstm(self, q: Tensor, k: Tensor, v: Tensor, igate: Tensor, fgate: Tensor,
               segment_ids: Tensor | None, state: LayerCache | None, fused: bool) -> Tensor:
        """The mLSTM branch continuing (and updating) a layer's cache: chunkwise over a prompt, one step per
        decoded token. k (B, NKV, S, D) as in _mlstm_fresh (the feature map reads GQA heads), v repeated to NH."""
        import xdistill_kernels as xk

        fq, fk = self.phi_q(q, fused), self.phi_k(k, fused)
        if state.mlstm is not None and q.shape[2] == 1:
            h, new_state = xk.mlstm_step(fq[:, :, 0], fk[:, :, 0], v[:, :, 0], igate[..., 0], fgate[..., 0],
                                         state.mlstm)
            state.store_mlstm(new_state)
            return h.unsqueeze(2)
        h, new_state = xk.mlstm(fq, fk, v, igate, fgate, segment_ids=segment_ids, initial_state=state.mlstm,
                                return_final_state=True, backend=self.mlstm_backend)
        state.store_mlstm(new_state)
        return h

    def forward(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, *, scaling: float | None,
                teacher_window: int | None, ctx: MixerContext) -> Tensor:
        """q (B, NH, S, D), k/v (B, NKV, S, D) after RoPE, x (B, S, hidden) -> (B, NH, S, D)."""
        # Under autocast RoPE leaves q and k in fp32 (its cos/sin are fp32) while v is in the autocast
        # dtype. SDPA would run in the autocast dtype; our kernels must too, or they fall back to fp32
        # arithmetic (measured: 10x slower mLSTM on an H100).
        q, k = q.to(v.dtype), k.to(v.dtype)
        cache = ctx.cache
        state = cache.layer(self.layer_idx) if cache is not None else None
        segment_ids = ctx.segment_ids
        needs_teacher = self.kind == "attention" or ctx.align
        teacher = None
        if needs_teacher:
            teacher = self._attend(q, k, v, teacher_window, 0, scaling, segment_ids, ctx, state,
                                   update=self.kind == "attention")
        if self.kind == "attention":
            return teacher

        n_rep = q.shape[1] // k.shape[1]
        swa = None
        if self.kind in ("hybrid", "swa"):
            swa = self._attend(q, k, v, self.window, self.n_sinks, scaling, segment_ids, ctx, state, update=True)
        if self.kind == "swa":
            out = swa
        else:
            fused = self._fused(q)
            if self.kind == "linear":  # constant gates: i = 1, f = sigmoid(30) ~ 1
                shape = q.shape[:3]
                igate = torch.zeros(shape, device=q.device)
                fgate = torch.full(shape, 30.0, device=q.device)
                o = None
            else:
                igate, fgate, o = self._gate_preacts(x, fused)
            if state is None:
                h = self._mlstm_fresh(q, k, v, igate, fgate, segment_ids, fused)
            else:
                h = self._mlstm(q, k, repeat_kv(v, n_rep), igate, fgate, segment_ids, state, fused)
            if o is None:
                out = h
            elif fused:
                import xdistill_kernels as xk

                out = xk.gate_mix(o, h, swa)
            else:
                o = o.unsqueeze(-1)
                out = (o * h.float() + (1 - o) * swa.float()).to(q.dtype)
        if ctx.align:
            # Not ctx.align_losses[self.layer_idx] here: inside a compiled block (compile_blocks) dynamo would guard
            # on the dict's keys, which grow by one per layer, and on layer_idx, an int module attribute it treats
            # as a constant; both differ per block, so every block compiled anew and past the recompile limit (8)
            # ran eagerly. A write under a fixed name guards on neither; the block's eager forward hook files it.
            ctx.pending_align_loss = F.mse_loss(out.float(), teacher.detach().float())
            return teacher
        return out

    # -- softmax attention, training and cached ----------------------------------------------------
    def _attend(self, q, k, v, window, n_sinks, scaling, segment_ids, ctx: MixerContext, state,
                update: bool) -> Tensor:
        import xdistill_kernels as xk

        cache = ctx.cache
        if not ctx.continuing:
            out = xk.attention(q, k, v, window=window, n_sinks=n_sinks, segment_ids=segment_ids, scale=scaling,
                               backend=self.attention_backend, mask_cache=ctx.mask_cache)
            if cache is not None and update:
                _fill_buffers(state, k, v, ctx.prompt_doc_len, window, n_sinks, ctx.fill_plans)
            return out
        return _cached_attention(q, k, v, state, cache.doc_len, window, n_sinks, scaling, update)


def cache_doc_len(segment_ids: Tensor | None, batch: int, seqlen: int, device: torch.device) -> Tensor:
    """Length (B,) of each row's last document in a fresh prompt (the trailing run of the last id)."""
    if segment_ids is None:
        return torch.full((batch,), seqlen, device=device, dtype=torch.long)
    changed = (segment_ids != segment_ids[:, -1:]).long()
    last_break = (changed * torch.arange(1, seqlen + 1, device=device)).amax(-1)
    return seqlen - last_break


def _fill_buffers(state: LayerCache, k: Tensor, v: Tensor, doc_len: Tensor, window: int | None,
                  n_sinks: int, plans: dict) -> None:
    """Fill a layer's attention buffers from a fresh prompt's keys/values (B, NKV, S, D); ``plans``: the pass's
    shared static-cache gather plans (``StaticLayerCache.fill``)."""
    if isinstance(state, StaticLayerCache):
        state.fill(k, v, doc_len, window, n_sinks, plans)
        return
    S = k.shape[2]
    if window is None:  # full attention: keep everything
        state.win_k, state.win_v = k, v
        return
    pad = max(window - S, 0)
    state.win_k = F.pad(k, (0, 0, pad, 0))[:, :, -window:]
    state.win_v = F.pad(v, (0, 0, pad, 0))[:, :, -window:]
    if n_sinks:
        idx = (S - doc_len)[:, None] + torch.arange(n_sinks, device=k.device)  # (B, n_sinks)
        idx = idx.clamp(max=S - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        state.sink_k, state.sink_v = k.gather(2, idx), v.gather(2, idx)


def _cached_attention(q, k_new, v_new, state: LayerCache, doc_len: Tensor, window: int | None, n_sinks: int,
                      scaling: float | None, update: bool) -> Tensor:
    """Attention of new tokens (continuing each row's current document) over the cached buffers.

    With a static cache one token per row goes through ``step_attention`` (fixed shapes, CUDA-graph safe)."""
    if isinstance(state, StaticLayerCache) and update and q.shape[2] == 1:
        return step_attention(q, k_new, v_new, state, doc_len, scaling)
    B, _, S, D = q.shape
    dev = q.device
    P = doc_len[:, None] + torch.arange(S, device=dev)  # (B, S) positions of the new queries
    if isinstance(state, StaticLayerCache):  # sinks and ring in one buffer
        keys, vals, kpos = [state.keys], [state.values], [state.positions(doc_len)]
    else:
        keys, vals, kpos = [], [], []
        if window is not None and n_sinks and state.sink_k is not None:
            s = torch.arange(n_sinks, device=dev)[None, :].expand(B, -1)
            in_window = s >= (doc_len[:, None] - window)  # already present in the window buffer: count once
            keys.append(state.sink_k)
            vals.append(state.sink_v)
            kpos.append(torch.where((s < doc_len[:, None]) & ~in_window, s, -1))
        keys.append(state.win_k)
        vals.append(state.win_v)
        kpos.append(slot_positions(doc_len, state.win_k.shape[2]))
    keys.append(k_new)
    vals.append(v_new)
    kpos.append(P)
    kk, vv, pos = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(kpos, 1)
    visible = (pos[:, None, :] >= 0) & (pos[:, None, :] <= P[:, :, None])
    if window is not None:
        visible &= ((P[:, :, None] - pos[:, None, :]) < window) | (pos[:, None, :] < n_sinks)
    n_rep = q.shape[1] // kk.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(kk, n_rep), repeat_kv(vv, n_rep), attn_mask=visible[:, None],
                                         scale=scaling)
    if update:
        _push(state, k_new, v_new, doc_len, window, n_sinks)
    return out


def _push(state: LayerCache, k_new: Tensor, v_new: Tensor, doc_len: Tensor, window: int | None,
          n_sinks: int) -> None:
    """Append new keys/values to a layer's buffers (window: keep the last W; sinks: the first n_sinks)."""
    if isinstance(state, StaticLayerCache):
        state.push(k_new, v_new, doc_len)
        return
    state.win_k = torch.cat([state.win_k, k_new], 2)
    state.win_v = torch.cat([state.win_v, v_new], 2)
    if window is None:
        return
    state.win_k, state.win_v = state.win_k[:, :, -window:], state.win_v[:, :, -window:]
    if n_sinks and state.sink_k is not None:
        S = k_new.shape[2]
        rel = torch.arange(n_sinks, device=k_new.device)[None, :] - doc_len[:, None]  # (B, n_sinks)
        fresh = (rel >= 0) & (rel < S)  # sink slots filled by the new tokens
        idx = rel.clamp(0, S - 1)[:, None, :, None].expand(-1, k_new.shape[1], -1, k_new.shape[3])
        m = fresh[:, None, :, None]
        state.sink_k = torch.where(m, k_new.gather(2, idx), state.sink_k)
        state.sink_v = torch.where(m, v_new.gather(2, idx), state.sink_v)


def _attention_function(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, *,
                        scaling: float | None = None, sliding_window: int | None = None,
                        xdistill_ctx: MixerContext | None = None, xdistill_x: Tensor | None = None,
                        **kwargs) -> tuple[Tensor, None]:
    """transformers attention-function signature; returns (B, S, NH, D) like sdpa_attention_forward."""
    if xdistill_ctx is None:
        xdistill_ctx = MixerContext()
    out = module.xdistill_mixer(query, key, value, xdistill_x, scaling=scaling, teacher_window=sliding_window,
                                ctx=xdistill_ctx)
    return out.transpose(1, 2).contiguous(), None


def _hand_layer_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of an attention module: pass its input x_t on to the mixer (the gates read it)."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return args, {**kwargs, "xdistill_x": x}


def align_context(block_kwargs: dict) -> MixerContext | None:
    """The stage-I ``MixerContext`` among a decoder block's call arguments (block hooks), or None outside stage I."""
    ctx = block_kwargs.get("xdistill_ctx")
    return ctx if isinstance(ctx, MixerContext) and ctx.align else None


@torch.compiler.disable  # eager even where the block's call is compiled: nn.Module.compile traces hooks as frames
def _file_align_loss(layer_idx: int, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    """Forward hook of a decoder block: move the mixer's stage-I loss into ``ctx.align_losses[layer_idx]``."""
    ctx = align_context(kwargs)
    if ctx is not None and ctx.pending_align_loss is not None:
        ctx.align_losses[layer_idx] = ctx.pending_align_loss
        ctx.pending_align_loss = None


def attach_align_recorder(block: nn.Module, layer_idx: int) -> RemovableHandle:
    """Install the forward hook that files a decoder block's stage-I loss under ``layer_idx``; returns its handle.

    The per-layer bookkeeping lives in this eager hook rather than in the mixer, so that the compiled part of
    every block is the same and identical blocks share one graph in stage I as in stage II. Installed for the
    duration of an ``align`` forward only (``XDistillForCausalLM.forward``): a step compiled whole with
    ``fullgraph`` (the static-cache decode step) inlines block hooks and cannot call a compiler-disabled one.
    Registered last, so hooks installed before (``route_align_losses_through_blocks``) see the loss pending."""
    return block.register_forward_hook(partial(_file_align_loss, layer_idx), with_kwargs=True)


def register_attention_function() -> None:
    """Register ``"xdistill"`` with transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention_function)


def attach_mixer(attn: nn.Module, mixer: HybridMixer) -> None:
    """Attach a mixer to a teacher attention module and install the layer-input hook."""
    attn.xdistill_mixer = mixer
    attn.register_forward_pre_hook(_hand_layer_input, with_kwargs=True)


def head_layout(config) -> tuple[int, int]:
    """(query heads, head dim) of a transformers config."""
    nh = config.num_attention_heads
    return nh, getattr(config, "head_dim", None) or config.hidden_size // nh

