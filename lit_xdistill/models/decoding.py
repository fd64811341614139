"""Fast decoding of the student: a static cache updated in place and a decode step replayed as a CUDA graph.

``StaticHybridCache`` is the fast path's cache. Per layer it allocates its buffers once, at prefill, and from
then on only writes into them (``copy_``/``scatter_``), so its memory is constant in the generated length and
no tensor of the cache is ever reallocated:

- the mLSTM state (C, n, m), overwritten after every step;
- one key and one value buffer (B, NKV, n_sinks + R, D): slots ``0 .. n_sinks-1`` hold the sinks (document
  position s in slot s), the other R slots a ring (document position p in slot ``n_sinks + p mod R``).
  R is the window W of the sliding-window branch, the teacher's window for a teacher sliding-window layer, or
  ``max_cache_len`` for a layer that keeps full attention.

Slot positions follow from each row's ``doc_len`` alone (see ``cache.py``), so the one-token decode step has
fixed shapes, computes its mask on the device and never synchronises with the host: it can be captured as a
CUDA graph. ``DecodeGraph`` does that for the whole model step; on other devices (and with
``cuda_graph=False``) the same step runs eagerly, which is what the CPU tests check against the plain cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import HybridCache, LayerCache

__all__ = ["DecodeGraph", "StaticHybridCache", "StaticLayerCache", "step_attention"]


@dataclass
class StaticLayerCache(LayerCache):
    """Decoding state of one layer in buffers allocated at prefill and then updated in place.

    ``sink_k``/``win_k`` (and the value counterparts) are views into ``keys``/``values``; ``mlstm`` is None until
    the prompt has been consumed and then the tuple of preallocated state buffers.
    """

    max_cache_len: int | None = None  # ring size of a full-attention layer
    keys: Tensor | None = None  # (B, NKV, n_sinks + R, D)
    values: Tensor | None = None
    n_sinks: int = 0
    mlstm_buffers: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def ring(self) -> int:
        """Number of ring slots R."""
        return self.keys.shape[2] - self.n_sinks

    def store_mlstm(self, state: tuple[Tensor, Tensor, Tensor]) -> None:
        """Copy a new mLSTM state into the preallocated buffers (allocated from the first state)."""
        if self.mlstm_buffers is None:
            self.mlstm_buffers = tuple(t.clone(memory_format=torch.contiguous_format) for t in state)
        else:
            for dst, src in zip(self.mlstm_buffers, state):
                dst.copy_(src)
        self.mlstm = self.mlstm_buffers

    def fill(self, k: Tensor, v: Tensor, doc_len: Tensor, window: int | None, n_sinks: int, plans: dict) -> None:
        """Store a fresh prompt's keys/values (B, NKV, S, D) whose last ``doc_len`` columns are each row's document.

        ``plans``: gather plans shared by the layers of one forward pass (same prompt, same ``doc_len``), keyed
        by (S, ring, sinks); a plan missing there is computed and added."""
        ring = window if window is not None else self.max_cache_len
        if ring is None:
            raise ValueError("a layer with full attention needs StaticHybridCache(max_cache_len=...)")
        S = k.shape[2]
        if window is None and S > ring:
            raise ValueError(f"prompt of {S} tokens exceeds the static cache's max_cache_len {ring}")
        self._allocate(k, n_sinks, ring)
        plan = plans.get((S, ring, n_sinks))
        if plan is None:
            pos = torch.cat([_sink_positions(doc_len, n_sinks, 0), _ring_positions(doc_len, ring)], 1)
            src = ((S - doc_len)[:, None] + pos).clamp(0, S - 1)[:, None, :, None]  # (B, 1, slots, 1)
            plan = plans[(S, ring, n_sinks)] = src, (pos >= 0)[:, None, :, None]
        src, stored = plan
        src = src.expand(-1, k.shape[1], -1, k.shape[3])
        self.keys.copy_(torch.where(stored, k.gather(2, src), 0))
        self.values.copy_(torch.where(stored, v.gather(2, src), 0))

    def push(self, k_new: Tensor, v_new: Tensor, doc_len: Tensor) -> None:
        """Write new keys/values (B, NKV, S, D) at document positions ``doc_len .. doc_len + S - 1``, in place."""
        B, NKV, S, D = k_new.shape
        keep = min(S, self.ring)  # of a chunk longer than the ring only the last R tokens stay
        pos = doc_len[:, None] + torch.arange(S - keep, S, device=doc_len.device)
        slot = (self.n_sinks + pos % self.ring)[:, None, :, None].expand(B, NKV, keep, D)
        self.keys.scatter_(2, slot, k_new[:, :, S - keep :])
        self.values.scatter_(2, slot, v_new[:, :, S - keep :])
        if self.n_sinks:
            rel = torch.arange(self.n_sinks, device=doc_len.device)[None, :] - doc_len[:, None]  # (B, n_sinks)
            fresh = ((rel >= 0) & (rel < S))[:, None, :, None]  # sink slots reached by the new tokens
            idx = rel.clamp(0, S - 1)[:, None, :, None].expand(B, NKV, -1, D)
            for buf, new in ((self.sink_k, k_new), (self.sink_v, v_new)):
                buf.copy_(torch.where(fresh, new.gather(2, idx), buf))

    def positions(self, doc_len: Tensor) -> Tensor:
        """Document position (B, n_sinks + R) of every slot once ``doc_len`` tokens are stored; -1 where a slot is
        empty or a sink is also still in the ring (so that every key counts once)."""
        return torch.cat([_sink_positions(doc_len, self.n_sinks, self.ring), _ring_positions(doc_len, self.ring)], 1)

    def _allocate(self, like: Tensor, n_sinks: int, ring: int) -> None:
        B, NKV, _, D = like.shape
        shape = (B, NKV, n_sinks + ring, D)
        if self.keys is None:
            self.keys, self.values = like.new_zeros(shape), like.new_zeros(shape)
            self.n_sinks = n_sinks
            self.sink_k, self.sink_v = self.keys[:, :, :n_sinks], self.values[:, :, :n_sinks]
            self.win_k, self.win_v = self.keys[:, :, n_sinks:], self.values[:, :, n_sinks:]
        elif (self.keys.shape, self.keys.dtype, self.keys.device) != (shape, like.dtype, like.device):
            raise ValueError(f"static cache holds keys {tuple(self.keys.shape)} {self.keys.dtype} on "
                             f"{self.keys.device}, got {shape} {like.dtype} on {like.device}: use a new cache")


def _sink_positions(doc_len: Tensor, n_sinks: int, ring: int) -> Tensor:
    """(B, n_sinks): sink s holds position s once the document has s + 1 tokens, unless the ring (the last
    ``ring`` positions) still holds it; ring = 0 gives what is stored."""
    s = torch.arange(n_sinks, device=doc_len.device)[None, :]
    return torch.where(s < doc_len[:, None] - ring, s, -1)


def _ring_positions(doc_len: Tensor, ring: int) -> Tensor:
    """(B, ring): slot j holds the newest position p < doc_len with p = j mod ring, or -1."""
    last = doc_len[:, None] - 1
    p = last - torch.remainder(last - torch.arange(ring, device=doc_len.device), ring)
    return p.clamp_min(-1)


def step_attention(q: Tensor, k_new: Tensor, v_new: Tensor, state: StaticLayerCache, doc_len: Tensor,
                   scaling: float | None) -> Tensor:
    """Attention of one new token per row over [sinks, ring] after writing it into the ring.

    q (B, NH, 1, D), k_new/v_new (B, NKV, 1, D), doc_len (B,) tokens stored before this one -> (B, NH, 1, D).
    Fixed shapes, no host sync. GQA without copies: the NH / NKV query heads of a KV head are the query rows
    of one SDPA call over that head's buffer (they share the mask: all are at the same position).
    """
    state.push(k_new, v_new, doc_len)
    B, NH, _, D = q.shape
    NKV = state.keys.shape[1]
    visible = state.positions(doc_len + 1) >= 0  # ring slots are within the window by construction
    out = F.scaled_dot_product_attention(q.reshape(B, NKV, NH // NKV, D), state.keys, state.values,
                                         attn_mask=visible[:, None, None, :], scale=scaling)
    return out.reshape(B, NH, 1, D)


class _DecodingModel(Protocol):
    def decode_step(self, input_ids: Tensor, cache: StaticHybridCache) -> Tensor: ...


DecodeStep = Callable[[Tensor, "StaticHybridCache"], Tensor]


class DecodeGraph:
    """A one-token decode step (``model.decode_step`` or its compiled form) captured once as a CUDA graph.

    The first call runs the step eagerly on a side stream (a real step: it compiles the Triton kernels and
    initialises cuBLAS there) and then captures it on that stream; the capture records the kernels without
    running them. Later calls copy the tokens into the static input, replay, and return a copy of the logits.

    Two things here keep decode memory from growing over successive caches (on an H100 it grew by ~0.1 GiB per
    context point of the benchmark, which read as growth with context length, docs/benchmarks.md):
    - the cache owns its graph and is passed in at every call rather than kept here: a back-reference makes a
      reference cycle, and a dropped cache, with its buffers and its graph's private pool, then stays allocated
      until Python's cyclic collector runs;
    - every capture uses one side stream per device (``_capture_stream``): cuBLAS gets a workspace per stream
      from the caching allocator and keeps it for the life of the process (32 MiB on Hopper), so a new stream
      per graph added that much for every cache ever captured (the eager rows grew ~33 MB per cache).
    """

    def __init__(self, step: DecodeStep):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_ids: Tensor | None = None
        self.static_logits: Tensor | None = None

    def __call__(self, input_ids: Tensor, cache: StaticHybridCache) -> Tensor:
        """input_ids (B, 1) -> logits (B, 1, V); advances ``cache`` (the one captured) by one token."""
        if self.graph is None:
            return self._warm_up_and_capture(input_ids, cache)
        self.static_ids.copy_(input_ids)
        self.graph.replay()
        return self.static_logits.clone()

    def _warm_up_and_capture(self, input_ids: Tensor, cache: StaticHybridCache) -> Tensor:
        main = torch.cuda.current_stream(input_ids.device)
        side = _capture_stream(input_ids.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self.step(input_ids, cache)
            self.static_ids = input_ids.clone(memory_format=torch.contiguous_format)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self.static_logits = self.step(self.static_ids, cache)
        main.wait_stream(side)
        self.graph = graph
        return logits.clone()


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every DecodeGraph of ``device`` warms up and captures on (see DecodeGraph).

    Sharing it is safe because each DecodeGraph runs a real step on it before capturing: the stream's cuBLAS
    workspace is then allocated eagerly, outside any graph's private pool, so no graph holds memory that a
    later graph on the same stream would reuse after the first one is freed (pytorch/pytorch#193402)."""
    device = torch.device(device)
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


@dataclass
class StaticHybridCache(HybridCache):
    """The fast path's cache: buffers allocated at prefill and updated in place, CUDA-graph decoding.

    Pass it as ``cache=`` to the model or to ``generate()`` (or let ``generate(cache_implementation="static")``
    make one). A cache belongs to one model, batch size, device and dtype; ``reset()`` makes it ready for a new
    prompt while keeping its buffers and its captured graph.

    Args:
        batch_size: rows B.
        max_cache_len: most tokens a document may reach in a layer that keeps full attention (mixer
            ``attention`` without a teacher window); not needed otherwise. Not checked while decoding.
        cuda_graph: replay the one-token decode step as a CUDA graph when running on CUDA.
        compile_step: run the decode step through ``torch.compile`` (inductor, whole graph, static shapes)
            before it is captured. A graph replay costs a few microseconds per kernel, and the eager step of a
            30-layer SmolLM2 student is thousands of small kernels (4,222 compute ops counted on CPU), so its
            replay took 5.6 ms on an H100 whatever the context (batch 1); inductor fuses the pointwise chains into
            far fewer kernels: 2.8 ms, i.e. 2x the decode tokens/s at every batch and context measured
            (docs/benchmarks.md). The first step pays the compilation (once per batch size).
    """

    max_cache_len: int | None = None
    cuda_graph: bool = True
    compile_step: bool = False
    graph: DecodeGraph | None = field(default=None, init=False, repr=False)
    _compiled: DecodeStep | None = field(default=None, init=False, repr=False)

    def layer(self, idx: int) -> StaticLayerCache:
        """The state of layer ``idx`` (created empty on first use, its buffers at prefill)."""
        layer = self.layers.get(idx)
        if layer is None:  # not setdefault: a compiled decode step would guard on max_cache_len and recompile
            layer = self.layers[idx] = StaticLayerCache(max_cache_len=self.max_cache_len)  # for every capacity
        return layer

    def advance(self, new_doc_len: Tensor, n_columns: int) -> None:
        """Record that a forward pass consumed ``n_columns`` columns (``doc_len`` is written in place)."""
        if self.doc_len is None:
            self.doc_len = new_doc_len.clone()
        else:
            self.doc_len.copy_(new_doc_len)
        self.seen_tokens += n_columns

    def reset(self) -> None:
        """Forget the consumed tokens (the next forward pass is a fresh prompt); buffers and graph are kept."""
        self.seen_tokens = 0
        for layer in self.layers.values():
            layer.mlstm = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Select batch rows (beam search), in place."""
        tensors = [self.doc_len] if self.doc_len is not None else []
        for layer in self.layers.values():
            tensors += [t for t in (layer.keys, layer.values) if t is not None]
            tensors += list(layer.mlstm_buffers or ())
        for t in tensors:
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def decode(self, model: _DecodingModel, input_ids: Tensor) -> Tensor:
        """One token per row (B, 1) through ``model.decode_step`` (compiled if asked), replayed as a CUDA graph on CUDA
        -> logits."""
        # generate() passes a strided slice of its growing sequence; a compiled step guards on strides and
        # would recompile every step (on CUDA inside the graph capture, where compiling is not allowed).
        input_ids = input_ids.contiguous()
        step = model.decode_step
        if self.compile_step:
            if self._compiled is None:
                self._compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
            step = self._compiled
        if self.cuda_graph and input_ids.is_cuda:
            if self.graph is None:
                self.graph = DecodeGraph(step)
            logits = self.graph(input_ids, self)
        else:
            logits = step(input_ids, self)
        self.seen_tokens += 1
        return logits
