"""The fast decoding path (StaticHybridCache, in-place buffers, CUDA-graph step) against the plain reference path."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from tiny_teachers import tiny_teacher

from lit_xdistill.models import student_from_teacher
from lit_xdistill.models.decoding import StaticHybridCache

WINDOW = 8


def _student(mixer="hybrid", family="llama", dtype=torch.float32):
    # open output gate so both branches matter
    return student_from_teacher(tiny_teacher(family), window=WINDOW, n_sinks=2, mixer=mixer,
                                ogate_bias=0.0).to(dtype).eval()


def _padded_prompt(batch=3, length=14):
    """Rows of 14, 9 and 3 tokens (left padded): longer and shorter than the window."""
    torch.manual_seed(1)
    prompt = torch.randint(1, 128, (batch, length))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return prompt.masked_fill(mask == 0, 0), mask


def _cache_tensors(cache: StaticHybridCache) -> dict[str, tuple[int, tuple[int, ...]]]:
    found = {"doc_len": cache.doc_len}
    for idx, layer in cache.layers.items():
        found.update({f"{idx}.keys": layer.keys, f"{idx}.values": layer.values})
        found.update({f"{idx}.mlstm{i}": t for i, t in enumerate(layer.mlstm_buffers or ())})
    return {name: (t.data_ptr(), tuple(t.shape)) for name, t in found.items() if t is not None}


@pytest.mark.parametrize(("family", "mixer"), [("llama", "hybrid"), ("llama", "swa"), ("llama", "mlstm"),
                                               ("gemma3_text", "attention")])
def test_static_generate_equals_plain_generate(family, mixer):
    # gemma3 "attention": a teacher sliding-window layer (ring of the teacher's window) and a full-attention layer
    student = _student(mixer, family)
    prompt, mask = _padded_prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    plain = student.generate(prompt, **kwargs)
    fast = student.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(plain.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mixer", ["hybrid", "swa", "mlstm", "linear", "attention"])
def test_static_cache_chunks_and_steps_equal_full_forward(mixer):
    student = _student(mixer, dtype=torch.float64)
    x = torch.randint(0, 128, (2, 40))
    # prefill, single steps, a chunk longer than the window (13 > 8), single steps again
    pieces = [(0, 11), *[(i, i + 1) for i in range(11, 20)], (20, 33), *[(i, i + 1) for i in range(33, 40)]]
    with torch.no_grad():
        full = student(x).logits
        cache = StaticHybridCache(batch_size=2, max_cache_len=40)
        parts = [student(x[:, a:b], cache=cache, use_cache=True).logits for a, b in pieces]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_static_cache_memory_is_constant_and_reused():
    student = _student()
    prompt, mask = _padded_prompt()
    cache = StaticHybridCache(batch_size=3)
    with torch.no_grad():
        student(prompt, attention_mask=mask, cache=cache, use_cache=True)
        before = _cache_tensors(cache)
        for _ in range(4 * WINDOW):
            student(torch.randint(1, 128, (3, 1)), cache=cache, use_cache=True)
    assert _cache_tensors(cache) == before, "the static cache reallocated or grew while decoding"
    assert cache.seen_tokens == 14 + 4 * WINDOW

    first = student.static_cache(3, 40)
    student.generate(prompt, attention_mask=mask, max_new_tokens=5, cache_implementation="static", pad_token_id=0)
    buffers = _cache_tensors(first)
    student.generate(prompt, attention_mask=mask, max_new_tokens=9, cache_implementation="static", pad_token_id=0)
    assert student.static_cache(3, 40) is first and _cache_tensors(first) == buffers


def test_sampling_with_a_fixed_seed():
    student = _student()
    prompt, mask = _padded_prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    runs = {}
    for name, extra in [("plain", {}), ("fast", {"cache_implementation": "static"}),
                        ("fast again", {"cache_implementation": "static"})]:
        torch.manual_seed(123)
        runs[name] = student.generate(prompt, **kwargs, **extra)
    assert torch.equal(runs["fast"], runs["plain"])
    assert torch.equal(runs["fast again"], runs["fast"])


@pytest.mark.skipif("cache" not in transformers.generation.utils.ALL_CACHE_NAMES,
                    reason="this transformers does not reorder a cache named `cache` in beam search")
def test_beam_search_equals_uncached_beam_search():
    student = _student()
    prompt, mask = _padded_prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    reference = student.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(student.generate(prompt, cache_implementation="static", **kwargs), reference)


def test_generate_feeds_one_column_per_decode_step():
    """Every decode step continues the cache (transformers 5.17 hands back only caches named past_key_values),
    and the prefill computes the last position's logits only."""
    student = _student()
    widths = []  # (input columns, logit positions) of every forward
    student.register_forward_hook(
        lambda module, args, kwargs, out: widths.append((kwargs["input_ids"].shape[1], out.logits.shape[1])),
        with_kwargs=True)
    prompt = torch.randint(1, 128, (2, 6))
    for extra in ({}, {"cache_implementation": "static"}):
        widths.clear()
        student.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, **extra)
        assert widths == [(6, 1)] + [(1, 1)] * 4


def test_decode_step_needs_no_host_sync():
    """On the meta device any .item(), bool(tensor) or data-dependent shape raises: the step is capturable."""
    student = _student().to("meta")
    cache = StaticHybridCache(batch_size=2, cuda_graph=False)
    with torch.no_grad():
        student(torch.zeros(2, 12, dtype=torch.long, device="meta"), cache=cache, use_cache=True)
        logits = student.decode_step(torch.zeros(2, 1, dtype=torch.long, device="meta"), cache)
    assert logits.shape == (2, 1, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager_and_plain(dtype):
    student = _student(dtype=dtype).cuda()
    prompt, mask = _padded_prompt()
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    plain = student.generate(prompt.cuda(), **kwargs)
    eager = student.generate(prompt.cuda(), cache=StaticHybridCache(batch_size=3, cuda_graph=False), **kwargs)
    # disable_compile: the graph of the eager step, which must replay it exactly (inductor may round differently)
    graph = student.generate(prompt.cuda(), cache_implementation="static", disable_compile=True, **kwargs)
    cache = student.static_cache(3, 1)  # the one generate() used
    assert cache.graph is not None and cache.graph.graph is not None, "the decode step was not captured"
    assert torch.equal(graph, eager), "replaying the graph differs from running the same step eagerly"
    if dtype == torch.float32:  # bf16 may flip near-ties between the plain and the fast attention order
        assert torch.equal(graph, plain)


@pytest.mark.gpu
def test_static_generate_compiles_the_decode_step_on_cuda():
    """generate(cache_implementation="static") compiles the step on CUDA (as transformers compiles a static-cache
    forward), and it gives the eager fast path's greedy tokens (float32: no bf16 near-ties)."""
    student = _student().cuda()
    prompt, mask = _padded_prompt()
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=2 * WINDOW, do_sample=False, pad_token_id=0)
    eager = student.generate(prompt.cuda(), cache=StaticHybridCache(batch_size=3, cuda_graph=False), **kwargs)
    compiled = student.generate(prompt.cuda(), cache_implementation="static", **kwargs)
    cache = student.static_cache(3, 1, compile_step=True)  # the one generate() used
    assert cache._compiled is not None and cache.graph.graph is not None
    assert torch.equal(compiled, eager)
    student.generate(prompt.cuda(), cache_implementation="static", disable_compile=True, **kwargs)
    assert student.static_cache(3, 1)._compiled is None  # disable_compile gave an uncompiled cache


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("mixer", ["hybrid", "attention"])
def test_compiled_decode_step_equals_eager(mixer):
    """compile_step traces the whole step as one graph (fullgraph: a graph break raises) and changes nothing."""
    student = _student(mixer)
    prompt, mask = _padded_prompt()
    logits = {}
    for compiled in (False, True):
        cache = StaticHybridCache(batch_size=3, max_cache_len=40, cuda_graph=False, compile_step=compiled)
        steps = []
        with torch.no_grad():
            token = student(prompt, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(2 * WINDOW):  # past the window: the ring wraps
                steps.append(student(token, cache=cache, use_cache=True).logits)
                token = steps[-1].argmax(-1)
        logits[compiled] = torch.cat(steps, 1)
        assert (cache._compiled is not None) == compiled
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decode_step_is_reused_across_prompt_lengths():
    """A hybrid student's step has the same shapes whatever the prompt length or cache capacity, so a second
    cache of the same batch size runs the step compiled for the first (a guard on the capacity recompiled it
    for every prompt, each time compiling the whole 30-layer step on a GPU)."""
    from torch._dynamo.utils import counters

    student = _student()
    torch._dynamo.reset()
    compiled_graphs = []
    for length, capacity in ((14, 40), (30, 90)):
        prompt = torch.randint(1, 128, (2, length), generator=torch.Generator().manual_seed(length))
        cache = StaticHybridCache(batch_size=2, max_cache_len=capacity, cuda_graph=False, compile_step=True)
        with torch.no_grad():
            token = student(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(3):
                token = student(token, cache=cache, use_cache=True).logits.argmax(-1)
        compiled_graphs.append(counters["stats"]["unique_graphs"])
    assert compiled_graphs[0] >= 1, "the decode step was not compiled"
    assert compiled_graphs[1] == compiled_graphs[0], "the second prompt length recompiled the decode step"


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_generate_compiles_the_decode_step_once():
    """generate() hands the step a strided slice of its growing sequence (stride (L, 1), L changing every
    step). A compiled step guards on strides, so each step recompiled, and on CUDA the compile fell inside the
    graph capture after the warm-up step (cudaErrorStreamCaptureUnsupported on an H200)."""
    from torch._dynamo.utils import counters

    student = _student()
    prompt, mask = _padded_prompt()
    torch._dynamo.reset()
    counters.clear()
    cache = StaticHybridCache(batch_size=3, cuda_graph=False, compile_step=True)
    student.generate(prompt, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert counters["stats"]["unique_graphs"] == 1, "the decode step was compiled more than once"


def test_a_dropped_static_cache_is_freed_without_the_cycle_collector():
    """Nothing the cache owns (its layers, its decode graph) points back to it, so dropping the last reference
    frees its buffers at once. With a cycle they waited for Python's cyclic collector, and every dropped cache's
    CUDA-graph memory pool stayed allocated meanwhile (decode memory rose by ~0.1 GiB per dropped cache on an
    H100)."""
    import gc
    import weakref

    from lit_xdistill.models.decoding import DecodeGraph

    student = _student()
    prompt, mask = _padded_prompt()
    cache = StaticHybridCache(batch_size=3, cuda_graph=False)
    with torch.no_grad():
        token = student(prompt, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        student(token, cache=cache, use_cache=True)
    cache.graph = DecodeGraph(student.decode_step)  # what decode() attaches on CUDA
    buffers = weakref.ref(cache.layers[0].keys)
    gc.disable()
    try:
        del cache
        assert buffers() is None, "the cache's buffers outlived it: a reference cycle holds them"
    finally:
        gc.enable()


@pytest.mark.gpu
def test_cuda_graph_cache_memory_is_returned_when_dropped():
    """Decoding with a captured graph, then dropping the cache, gives back every byte the cache and its graph's
    pool took, without a gc.collect(): a second decode after it starts from the same allocated memory."""
    student = _student(dtype=torch.bfloat16).cuda()
    prompt, mask = (t.cuda() for t in _padded_prompt())
    kwargs = dict(attention_mask=mask, max_new_tokens=WINDOW, do_sample=False, pad_token_id=0)
    before = []
    for _ in range(2):
        torch.cuda.synchronize()
        before.append(torch.cuda.memory_allocated())
        student.generate(prompt, cache=StaticHybridCache(batch_size=3), **kwargs)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before[0] == before[1]
