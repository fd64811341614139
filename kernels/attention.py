"""Causal softmax attention with an optional sliding window, per-document sinks and packed documents.

Key j is visible to query i iff j <= i, both lie in the same document (segment ids: a new document starts
wherever the id differs from the previous position's), and either there is no window, or i - j < window, or
j is among the first `n_sinks` tokens of its document. j = i is always visible, so no row is empty.

Backends: "flex" (torch FlexAttention; compiled on CUDA, block masks cached), "sdpa" (a dense boolean mask
through scaled_dot_product_attention: the reference, O(S^2) memory), "auto" (flex on CUDA, sdpa otherwise).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import document_index

_BLOCK_MASKS: OrderedDict = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 16
_COMPILED_FLEX = None


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


def _attention_sdpa(q, k, v, window, n_sinks, segment_ids, scale):
    B, NH, S, _ = q.shape
    mask = visibility_mask(S, window=window, n_sinks=n_sinks, segment_ids=segment_ids, batch=B,
                           device=q.device)
    rep = NH // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)


def _block_mask(B, S, window, n_sinks, segment_ids, device):
    """FlexAttention block mask, cached by (S, window, sinks, device, segment-id contents)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg_key = None
    if segment_ids is not None:  # content key: one small device-to-host copy, never a stale mask
        seg_key = (tuple(segment_ids.shape), hashlib.sha1(segment_ids.cpu().numpy().tobytes()).hexdigest())
    key = (S, window, n_sinks, str(device), seg_key)
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]
    doc, start = _doc_and_start(segment_ids, B if segment_ids is not None else 1, S, device)

    def mask_mod(b, h, q_idx, kv_idx):
        bb = b if segment_ids is not None else 0
        visible = (kv_idx <= q_idx) & (doc[bb, q_idx] == doc[bb, kv_idx])
        if window is not None:  # no in-place ops here: inductor cannot lower them inside a mask_mod
            visible = visible & (((q_idx - kv_idx) < window) | ((kv_idx - start[bb, kv_idx]) < n_sinks))
        return visible

    mask = create_block_mask(mask_mod, B if segment_ids is not None else None, None, S, S, device=device)
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


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
) -> Tensor:
    """Causal (sliding-window + sinks, document-aware) softmax attention; returns (B,NH,S,D) in q's dtype.

    scale defaults to 1/sqrt(D). Gradients are those of exact softmax attention (autograd / FlexAttention)."""
    B, NH, S, D = q.shape
    if k.shape[1] == 0 or NH % k.shape[1] or k.shape != v.shape or k.shape[0] != B or k.shape[2] != S:
        raise ValueError(f"attention: q {tuple(q.shape)} needs k, v (B, NKV, S, D) with NKV | NH; got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1 or None, got {window}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "sdpa"
    if backend == "flex":
        return _attention_flex(q, k, v, window, n_sinks, segment_ids, scale)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, window, n_sinks, segment_ids, scale)
    raise ValueError(f"attention: unknown backend {backend!r}; use 'auto', 'flex' or 'sdpa'")
