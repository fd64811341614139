"""Causal softmax attention with an optional sliding window, per-document sinks and packed documents.

Key j is visible to query i iff j <= i, both lie in the same document (segment ids: a new document starts
wherever the id differs from the previous position's), and either there is no window, or i - j < window, or
j is among the first `n_sinks` tokens of its document. j = i is always visible, so no row is empty.

Backends: "flex" (torch FlexAttention; compiled on CUDA, block masks cached), "sdpa" (a dense boolean mask
through scaled_dot_product_attention: the reference, O(S^2) memory), "auto": flex on CUDA when autograd is
recording (training) or the sequence is longer than DENSE_INFERENCE_MAX_LEN, sdpa otherwise. Why the split: the flex
kernel is compiled per shape (dynamic=False), and evaluation feeds a new (batch, length) pair almost every
call; past dynamo's recompile limit flex falls back to an unfused path that materialises all scores. Short
no-grad calls therefore take the dense mask, whose O(S^2) cost is small at those lengths.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import document_index

_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 16
_COMPILED_FLEX = None
DENSE_INFERENCE_MAX_LEN = 4096  # "auto" uses the dense mask under no_grad up to this length (docstring)
# From this length on CUDA the block mask is built by a compiled create_block_mask. Eager, it evaluates the
# mask_mod on the whole B x S x S grid: 17 G elements at S = 131072, where the student's prefill ran out of an
# H100's memory (docs/benchmarks.md); compiled, it reduces block by block (measured on CPU at S = 16384: peak
# RSS 2.9 -> 0.5 GB, 2.1 -> 0.24 s per build after a 10 s compilation). Shorter (training) lengths keep the
# eager build their timings were measured with.
COMPILED_MASK_MIN_LEN = 16384


def _doc_and_start(segment_ids: Tensor | None, B: int, S: int, device) -> tuple[Tensor, Tensor]:
    """(B,S) document index and (B,S) position of the first token of each position's document."""
    doc = document_index(segment_ids, B, S, device)
    pos = torch.arange(S, device=device).expand(B, S)
    is_start = torch.ones_like(doc, dtype=torch.bool)
    is_start[:, 1:] = doc[:, 1:] != doc[:, :-1]
    start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return doc, start


def visibility_mask(S: int, *, window=None, n_sinks=0, segment_ids=None, batch=1, device=None) -> Tensor:
    """Dense (B,S,S) boolean mask: [b, i, j] is True iff key j is visible to query i (module docstring)."""
    doc, start = _doc_and_start(segment_ids, batch, S, device)
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i) & (doc[:, :, None] == doc[:, None, :])
    if window is not None:
        sink = (j - start[:, None, :]) < n_sinks
        mask &= ((i - j) < window) | sink
    return mask


def _segment_key(segment_ids: Tensor | None):
    """Cache key of a segment-id tensor by identity and version counter, not by content: every layer of one
    forward pass gets the same tensor, so a mask is built once per pass without reading the ids on the host
    (a content hash costs one device-to-host sync per layer, which stalls the launch queue). An in-place edit
    bumps the version. Tensors made under ``torch.inference_mode`` have no version counter (reading it raises):
    their in-place edits, allowed only inside inference mode, go unseen."""
    if segment_ids is None:
        return None
    version = None if segment_ids.is_inference() else segment_ids._version
    return id(segment_ids), version, tuple(segment_ids.shape)


def _attention_sdpa(q, k, v, window, n_sinks, segment_ids, scale, mask_cache):
    B, NH, S, _ = q.shape
    # Inside a compiled block the mask is part of the graph: the key alone (the ids' identity) would make
    # dynamo guard on the segment-id tensor's id and recompile for every new batch.
    cached = mask_cache is not None and not torch.compiler.is_compiling()
    mask = None
    if cached:
        key = (S, window, n_sinks, str(q.device), _segment_key(segment_ids))
        mask = mask_cache.get(key)
    if mask is None:
        # one document per row: one (1, S, S) mask, broadcast over the rows
        mask = visibility_mask(S, window=window, n_sinks=n_sinks, segment_ids=segment_ids,
                               batch=B if segment_ids is not None else 1, device=q.device)
        if cached:
            mask_cache[key] = mask
    rep = NH // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def _block_mask(B, S, window, n_sinks, segment_ids, device):
    """FlexAttention block mask, cached by (S, window, sinks, device, segment-id tensor).

    The segment ids are keyed by ``_segment_key``. This cache outlives the pass, so a weak reference guards
    against a new tensor reusing a dead one's id.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    key = (S, window, n_sinks, str(device), _segment_key(segment_ids))
    cached = _BLOCK_MASKS.get(key)
    if cached is not None and (segment_ids is None or cached[0]() is segment_ids):
        _BLOCK_MASKS.move_to_end(key)
        return cached[1]
    if segment_ids is None:
        # One document: index arithmetic only. FlexAttention evaluates mask_mod on every element of its partial
        # blocks (with a 512 window: the diagonal, the window's far edge and the sinks), so tensor lookups there
        # cost every call, not only when the block mask is built.
        def mask_mod(b, h, q_idx, kv_idx):
            visible = kv_idx <= q_idx
            if window is not None:  # no in-place ops here: inductor cannot lower them inside a mask_mod
                visible = visible & (((q_idx - kv_idx) < window) | (kv_idx < n_sinks))
            return visible
    else:
        doc, start = _doc_and_start(segment_ids, B, S, device)  # (the closure must not keep the ids alive)

        def mask_mod(b, h, q_idx, kv_idx):
            visible = (kv_idx <= q_idx) & (doc[b, q_idx] == doc[b, kv_idx])
            if window is not None:
                visible = visible & (((q_idx - kv_idx) < window) | ((kv_idx - start[b, kv_idx]) < n_sinks))
            return visible

    mask = create_block_mask(mask_mod, B if segment_ids is not None else None, None, S, S, device=device,
                             _compile=_compile_mask_build(device, S))
    _BLOCK_MASKS[key] = (weakref.ref(segment_ids) if segment_ids is not None else None, mask)
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def _compile_mask_build(device, S: int) -> bool:
    """Whether create_block_mask runs compiled (see COMPILED_MASK_MIN_LEN)."""
    return torch.device(device).type == "cuda" and S >= COMPILED_MASK_MIN_LEN


def _attention_flex(q, k, v, window, n_sinks, segment_ids, scale):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    B, NH, S, _ = q.shape
    mask = _block_mask(B, S, window, n_sinks, segment_ids, q.device)
    fn = flex_attention
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    return fn(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != NH)


def attention(
    q: Tensor,  # (B, NH, S, D)
    k: Tensor,  # (B, NKV, S, D), NKV divides NH; query head h reads kv head h // (NH // NKV)
    v: Tensor,  # (B, NKV, S, D)
    *,
    window: int | None = None,
    n_sinks: int = 0,
    segment_ids: Tensor | None = None,  # (B, S) integer ids
    scale: float | None = None,
    backend: str = "auto",
    mask_cache: dict | None = None,
) -> Tensor:
    """Causal (sliding-window + sinks, document-aware) softmax attention; returns (B,NH,S,D) in q's dtype.

    scale defaults to 1/sqrt(D). Gradients are those of exact softmax attention (autograd / FlexAttention).
    mask_cache: a dict that lives for one forward pass, in which the sdpa backend keeps its dense masks, so that
    the layers of the pass build each mask once (it costs ~14 ops per layer on a host-bound short prompt) and
    nothing of it outlives the pass. The flex backend keeps its block masks in a cache of its own."""
    B, NH, S, D = q.shape
    if k.shape[1] == 0 or NH % k.shape[1] or k.shape != v.shape or k.shape[0] != B or k.shape[2] != S:
        raise ValueError(f"attention: q {tuple(q.shape)} needs k, v (B, NKV, S, D) with NKV | NH; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    if backend == "auto":
        # grad mode, not requires_grad: stage I's branches see frozen q, k, v but are training-sized calls
        backend = "flex" if q.is_cuda and (torch.is_grad_enabled() or S > DENSE_INFERENCE_MAX_LEN) else "sdpa"
    if backend == "flex":
        return _attention_flex(q, k, v, window, n_sinks, segment_ids, scale)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, window, n_sinks, segment_ids, scale, mask_cache)
    raise ValueError(f"attention: unknown backend {backend!r}; use 'auto', 'flex' or 'sdpa'")
