"""Constant-memory decoding state of the hybrid student.

Per layer the cache holds the mLSTM state (C, n, m) and, for the attention branch, a fixed-size buffer:
the first ``n_sinks`` keys/values of the current document and a chronological window of its last ``W``.
Memory is therefore constant in the generated length. Layers that keep the teacher's full attention
(mixer ``attention`` without a teacher window) keep a growing buffer instead.

Every row decodes the *last* document of its prompt (left padding is a document of its own), so the slot
positions follow from one number per row, ``doc_len`` (tokens of the current document seen so far):
window slot s holds document position ``doc_len - W + s`` (negative: empty), sink slot s position s.

This cache is the reference: it grows its window with ``torch.cat`` and slices it every step. The fast path's
``StaticHybridCache`` (``decoding.py``) keeps the same state in buffers updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["HybridCache", "LayerCache"]


@dataclass
class LayerCache:
    """Decoding state of one layer."""

    mlstm: tuple[Tensor, Tensor, Tensor] | None = None  # (C (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH)) fp32
    sink_k: Tensor | None = None  # (B, NKV, n_sinks, D)
    sink_v: Tensor | None = None
    win_k: Tensor | None = None  # (B, NKV, W or growing, D), oldest first
    win_v: Tensor | None = None

    def store_mlstm(self, state: tuple[Tensor, Tensor, Tensor]) -> None:
        """Keep the mLSTM state after a forward pass."""
        self.mlstm = state


@dataclass
class HybridCache:
    """The student's generation cache (passed as ``cache=`` and returned in the model output)."""

    batch_size: int
    layers: dict[int, LayerCache] = field(default_factory=dict)
    doc_len: Tensor | None = None  # (B,) tokens of each row's current document already consumed
    seen_tokens: int = 0  # columns of input_ids consumed (what generate() slices by)

    # What transformers' generate() asks of a cache: never torch.compile the forward around it (the static
    # cache replays its own CUDA graph), and let prepare_inputs_for_generation slice the inputs.
    is_compileable = False
    is_linear = (True,)

    def layer(self, idx: int) -> LayerCache:
        """The state of layer ``idx`` (created empty on first use)."""
        return self.layers.setdefault(idx, LayerCache())

    @property
    def is_empty(self) -> bool:
        """True before the first forward pass (the prompt is then processed as a fresh sequence)."""
        return self.seen_tokens == 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of input columns consumed so far (transformers' Cache API)."""
        return self.seen_tokens

    def advance(self, new_doc_len: Tensor, n_columns: int) -> None:
        """Record that a forward pass consumed ``n_columns`` columns."""
        self.doc_len = new_doc_len
        self.seen_tokens += n_columns

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select batch rows (beam search)."""
        for layer in self.layers.values():
            for name in ("sink_k", "sink_v", "win_k", "win_v"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, beam_idx.to(t.device)))
            if layer.mlstm is not None:
                layer.mlstm = tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer.mlstm)
        if self.doc_len is not None:
            self.doc_len = self.doc_len.index_select(0, beam_idx.to(self.doc_len.device))


def slot_positions(doc_len: Tensor, n_slots: int) -> Tensor:
    """Document positions (B, n_slots) of a chronological buffer whose last slot is the newest token."""
    return doc_len[:, None] - n_slots + torch.arange(n_slots, device=doc_len.device)
