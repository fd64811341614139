"""Forward+backward benchmark of the mLSTM kernels and the hybrid mixer on one GPU (bf16, median ms).

    python kernels/benchmarks/bench_mlstm.py --out $OUT        # writes bench_mlstm.md and bench_mlstm.json

Compares ours (chunkwise Triton) with mlstm-kernels `chunkwise--triton_limit_chunk` (and `triton_xl_chunk`
where it compiles), SDPA causal (flash) and FlexAttention SWA-512 + 4 sinks, at the shapes of issue 3;
ours also with 8 documents per row; the hybrid mixer (ours + attention(window=512, n_sinks=4) + sigmoid
gate) against SDPA causal; the decode step kernel's bandwidth. Checks ours against a float32 torch
reference first. Inputs: q, k, v ~ N(0,1) (q, k scaled by D**-0.5), igate ~ N(0,1), fgate ~ N(3,1);
the backward gets a fixed random upstream gradient.

    python kernels/benchmarks/bench_mlstm.py --out $OUT --launch-sweep   # also times LAUNCH_GRID per shape
    python kernels/benchmarks/bench_mlstm.py --out $OUT --graphs         # + ours (each chunk size too) and
                                                                         #   limit_chunk from CUDA graphs
    python kernels/benchmarks/bench_mlstm.py --out $OUT --shapes 0,3 --trace  # + a Chrome trace of ours per
                                                                         #   chunk size (kernel gaps on the GPU)
    python kernels/benchmarks/bench_mlstm.py --out $OUT --baseline old=/tmp/old/kernels  # + an A/B: another
                                                                         #   copy of kernels/ timed beside ours
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench
from xdistill_kernels import attention, gate_mix, mlstm, mlstm_fresh_state, mlstm_step
from xdistill_kernels.chunkwise_triton import _launch_overrides
from xdistill_kernels.launch import CompiledLaunch
from xdistill_kernels.reference import mlstm_chunkwise

SHAPES = [(1, 32, 4096, 128), (1, 32, 16384, 128), (1, 32, 65536, 128), (8, 9, 4096, 64), (2, 9, 16384, 64)]
PEAK_TFLOPS, PEAK_TBPS = 790.0, 3.0  # H100 SXM bf16 dense, HBM3 copy bandwidth

# --launch-sweep: "group:setting" -> overrides of ours' launch settings (kernels/chunkwise_triton.py, _config),
# each timed against the default with the rest left as is. The groups change disjoint settings, mostly of
# different kernels (fp32 gates are also read by _fwd_output and _bwd_grads), so their effects on the total
# roughly add up: the best entry of each group is combined and timed too ("best").
# states: pipelining of the sequential kernels' chunk loops; fp32 gates are what lets them prefetch the gate
# loads (docs/kernels.md). grads: the backward's dq/dk/dv kernel fused or split, and its warps (the split
# halves spill nothing at 8 warps except dq/dk at L = 128, D = 128; 4 warps spill at L = 128); split_dv4_dqdkr is
# the default's split at L = 128, D = 128 with the dq/dk launch's restructured block (dqdk_restructured: 328 -> 36 B
# of spill stores there, offline, triton 3.6 sm_90a). fwd_output: its warps, or its restructured block
# (output_restructured: q k^T before q C, q C as the (q k^T * P) v dot's accumulator, q loaded twice; spill stores
# 172 -> 48 B at L = 128, D = 128 with fp32 gates, 132 -> 52 B with bf16 gates, offline, triton 3.6 sm_90a).
# states:f32_bwd_ns3_ddenp: fp32 gates, _bwd_states pipelined 3 deep, and its dden load outside the `if vb == 0`
# branch (dden_prefetch), so the pipeliner prefetches it through cp.async like the other per-position loads instead
# of the vb == 0 programs waiting on a synchronous global load every chunk step (offline TTGIR, triton 3.6 sm_90a;
# it needs the NUM_STAGES annotation to be taken). Since the twelfth session's sweep (H100) the defaults are
# states:f32_bwd_ns3_ddenp at every L = 128, and with grads:split_dv4_dqdkr and fwd_output:restructured at
# L = 128, D = 128.
LAUNCH_GRID = {
    "states:bwd_ns3": {"bwd_states": {"NUM_STAGES": 3}},
    "states:f32": {"gates_fp32": True},
    "states:f32_bwd_ns3": {"gates_fp32": True, "bwd_states": {"NUM_STAGES": 3}},
    "states:f32_bwd_ns3_ddenp": {"gates_fp32": True, "bwd_states": {"NUM_STAGES": 3}, "dden_prefetch": True},
    "grads:split": {"split_bwd": True},
    "grads:split_dv4": {"split_bwd": True, "bwd_dv": {"num_warps": 4}},
    "grads:split_w4": {"split_bwd": True, "bwd_dqdk": {"num_warps": 4}, "bwd_dv": {"num_warps": 4}},
    "grads:split_dv4_dqdkr": {"split_bwd": True, "dqdk_restructured": True, "bwd_dv": {"num_warps": 4}},
    # dv (and dq/dk) from the chunk's three causal half-size sub-tiles, skipping the all-zero quarter (the split
    # launches; offline at L = 128, D = 128 the dv launch's spills drop from 448 to 140 B at 4 warps, to 0 at 8,
    # while the dq/dk launch's rise from 36 to 128 B)
    "grads:split_dvsub": {"split_bwd": True, "dv_subtiles": True},
    "grads:split_dvsub_dv8": {"split_bwd": True, "dv_subtiles": True, "bwd_dv": {"num_warps": 8}},
    "grads:split_subtiles": {"split_bwd": True, "dv_subtiles": True, "dqdk_subtiles": True},
    "grads:split_subtiles_dv8": {"split_bwd": True, "dv_subtiles": True, "dqdk_subtiles": True,
                                 "bwd_dv": {"num_warps": 8}},
    "fwd_output:w4": {"fwd_output": {"num_warps": 4}},
    "fwd_output:w8": {"fwd_output": {"num_warps": 8}},
    "fwd_output:restructured": {"output_restructured": True},
    # segments: the state kernels' chunk chain cut into G segments plus the carry passes (segments:1 = one chain)
    "segments:1": {"state_segments": 1},
    "segments:2": {"state_segments": 2},
    "segments:4": {"state_segments": 4},
    "segments:8": {"state_segments": 8},
    "segments:16": {"state_segments": 16},
}


def make(B, NH, S, D, seed=0, docs=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k = (r(B, NH, S, D) * D**-0.5).bfloat16(), (r(B, NH, S, D) * D**-0.5).bfloat16()
    v = r(B, NH, S, D).bfloat16()
    ig, fg = r(B, NH, S).bfloat16(), (r(B, NH, S) + 3).bfloat16()
    og = r(B, NH, S)  # output-gate pre-activation, fp32 as the student's gate_activations returns it
    dh = r(B, NH, S, D).bfloat16()
    seg = packed_segment_ids(B, S, docs, g) if docs else None
    for x in (q, k, v, ig, fg, og):
        x.requires_grad_()
    return (q, k, v, ig, fg), og, dh, seg


def packed_segment_ids(B, S, docs, generator):
    """(B, S) int64 segment ids of `docs` documents per row, cut at the same random positions in every row."""
    cuts = torch.sort(torch.randperm(S - 1, device="cuda", generator=generator)[: docs - 1] + 1).values
    seg = torch.zeros(B, S, dtype=torch.long, device="cuda")
    seg[:, cuts] = 1
    return seg.cumsum(1)


def outputs_and_grads(fn, leaves, dh):
    """[h, d leaves] of one forward+backward of fn() with upstream gradient dh."""
    h = fn()
    return [h.detach(), *torch.autograd.grad(h, leaves, dh)]


def max_rel_diff(xs, refs):
    """The largest relative L2 difference ||x - ref|| / ||ref|| over pairs of tensors."""
    return max(((x.float() - r.float()).norm() / r.float().norm()).item() for x, r in zip(xs, refs))


def fwd_bwd(fn, leaves, dh):
    def run():
        fn().backward(dh)

    return lambda: do_bench(run, warmup=50, rep=200, grad_to_none=leaves, return_mode="median")


def steady_host_ms(call, calls=10):
    """Host time (ms) to issue one forward+backward `call` (a cleared_call) in steady state: `calls` calls issued
    back to back while a long sleep kernel keeps the GPU busy, so that no call waits for the GPU and the CPU stays
    warm; the median of 5 such rounds. 10 calls of limit_chunk queue a few hundred kernels, well inside CUDA's launch
    queue (~1000 entries; a full queue would block the host and count GPU time). Where it exceeds the GPU time
    (the graphed columns), the eager median measures the host. (profile_ours' figure, one call after a 30 ms GPU
    sleep, counts a cold CPU and read ~2x the eager time.)"""
    for _ in range(3):
        call()
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # ~0.2 s at H100/H200 clocks, longer than `calls` calls take to issue
        start = time.perf_counter()
        for _ in range(calls):
            call()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
        torch.cuda.synchronize()
    return statistics.median(rounds)


def graphed_fwd_bwd(fn, leaves, dh):
    """fwd_bwd of fn(*leaves) replayed from CUDA graphs (torch.cuda.make_graphed_callables captures the forward
    and the backward): no host work per call, i.e. the kernels' time as a caller that graphs or compiles its
    step sees it. None (and the reason printed) where capture fails."""
    timer = graphed_timer(fn, leaves, dh)
    return timer() if timer else None


def graphed_timer(fn, leaves, dh):
    """graphed_fwd_bwd's timer, captured once and timed on each call; None where capture fails."""
    # Cached blocks handed back before the capture: a capture at (1, 32, 65536, 128) with 8 documents failed in
    # three runs ("operation failed due to a previous error during capture", 134 GiB reserved but unallocated
    # after it; sixteenth and eighteenth sessions, H200). A guess, not checked on a GPU: the card was full of
    # the caching allocator's free blocks, and a block allocated inside the capture could only come from
    # releasing them, which a capture does not allow.
    gc.collect()
    torch.cuda.empty_cache()
    try:
        graphed = torch.cuda.make_graphed_callables(fn, tuple(leaves), num_warmup_iters=3)
        return fwd_bwd(lambda: graphed(*leaves), leaves, dh)
    except Exception as e:  # reported, not fatal: the eager columns stand without it
        print(f"CUDA-graph capture failed: {type(e).__name__}: {str(e)[:1000]}", flush=True)
        return None


def load_baseline(spec):
    """--baseline NAME=DIR: (NAME, the mlstm of the copy of kernels/ in DIR), imported as its own package, so its
    Triton kernels compile and cache apart from ours."""
    name, _, path = spec.partition("=")
    if not name or not os.path.isfile(os.path.join(path, "__init__.py")):
        raise SystemExit(f"--baseline {spec!r}: expected NAME=DIR with DIR a copy of kernels/ (an __init__.py)")
    module = f"xdistill_kernels_{name}"
    found = importlib.util.spec_from_file_location(module, os.path.join(path, "__init__.py"),
                                                   submodule_search_locations=[path])
    package = importlib.util.module_from_spec(found)
    sys.modules[module] = package
    found.loader.exec_module(package)
    return name, package.mlstm


def compare_baselines(row, baselines, leaves, dh, seg8, graphs, rounds=3):
    """A/B of a kernel change on one card: ours and each --baseline's mlstm at the default chunk size, one
    document and 8, eager and (graphs) from CUDA graphs, timed in alternation for `rounds` rounds so that a drift
    of the card's clocks meets every column alike. row["ab"][name][case] is the median of its rounds (ms), case
    one of "1 doc", "8 docs" and those + " graphed". Each baseline's h and gradients must equal ours (relative L2
    < 5e-2) before it is timed: a baseline may chunk differently, and each side's bf16 gate gradients lie up to
    1.6e-2 from the fp32 reference (the correctness line), so two correct sides differ by up to ~3e-2, while a
    broken one is off by O(1)."""
    impls = {"ours": mlstm, **dict(baselines)}
    timers = {}
    for name, fn in impls.items():
        for case, seg in (("1 doc", None), ("8 docs", seg8)):
            call = lambda *x, fn=fn, seg=seg: fn(*x, segment_ids=seg, backend="triton")  # noqa: E731
            if name != "ours":
                err = max_rel_diff(outputs_and_grads(lambda call=call: call(*leaves), leaves, dh),
                                   outputs_and_grads(lambda seg=seg: mlstm(*leaves, segment_ids=seg, backend="triton"),
                                                     leaves, dh))
                assert err < 5e-2, f"baseline {name}, {case}: relative difference {err:.1e} from ours"
            timers[name, case] = fwd_bwd(lambda call=call: call(*leaves), leaves, dh)
            if graphs:
                timer = graphed_timer(call, leaves, dh)
                if timer:
                    timers[name, case + " graphed"] = timer
    times = {}
    for _ in range(rounds):
        for key, timer in timers.items():
            times.setdefault(key, []).append(timer())
    row["ab"] = {}
    for (name, case), t in times.items():
        row["ab"].setdefault(name, {})[case] = statistics.median(t)
    print(f"{row['shape']} A/B: {json.dumps(row['ab'])}", flush=True)


def flops_bytes(B, NH, S, D, L):
    """FLOPs of our algorithm (fwd+bwd, intra-chunk matrices computed in full) and the fewest bytes any
    fwd+bwd must move: q, k, v read and h written (forward); q, k, v, dh read and dq, dk, dv written."""
    per_pos = 2 * L * (4 * D + 3 * D) + 12 * D * D
    return B * NH * S * per_pos, 11 * B * NH * S * D * 2


def check_correctness(out_rows):
    """bf16 ours vs the float32 torch reference on the same (bf16-rounded) inputs."""
    for docs in (0, 8):
        (q, k, v, ig, fg), _, dh, seg = make(1, 8, 2048, 128, seed=1, docs=docs)
        leaves = [q, k, v, ig, fg]
        h = mlstm(q, k, v, ig, fg, segment_ids=seg, backend="triton")
        grads = torch.autograd.grad(h, leaves, dh)
        ref_in = [x.detach().float().requires_grad_() for x in leaves]
        h_ref, _ = mlstm_chunkwise(*ref_in, segment_ids=seg, chunk_size=128)
        grads_ref = torch.autograd.grad(h_ref, ref_in, dh.float())
        errs = {n: ((a.float() - b).norm() / b.norm()).item()
                for n, a, b in zip(["h", "dq", "dk", "dv", "dig", "dfg"], [h, *grads], [h_ref, *grads_ref])}
        print(f"correctness docs={docs}: " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
        out_rows.append({"check": f"docs={docs}", **errs})
        # bf16 operands give ~3e-3; dfgate is a reverse cumulative sum over the sequence of q.dq - k.dk,
        # whose per-position rounding errors add up over thousands of positions, hence its wider bound.
        assert all(e < (5e-2 if n == "dfg" else 2e-2) for n, e in errs.items()), errs


def peer_kernel(name):
    """A peer kernel, or None if it is absent or crashes while compiling (triton_xl_chunk aborts LLVM with
    triton 3.6, killing the process, so each peer first runs once in a child process)."""
    probe = (f"import torch; from mlstm_kernels.torch import get_mlstm_kernel as g; "
             f"x = [torch.randn(1, 2, 256, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True) "
             f"for _ in range(3)]; gt = [torch.randn(1, 2, 256, device='cuda', dtype=torch.bfloat16, "
             f"requires_grad=True) for _ in range(2)]; g('{name}')(*x, *gt, chunk_size=64).sum().backward()")
    probe_run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if probe_run.returncode != 0:
        print(f"peer {name} unavailable (rc {probe_run.returncode}): {probe_run.stderr[-300:]}", flush=True)
        return None
    try:
        from mlstm_kernels.torch import get_mlstm_kernel

        return get_mlstm_kernel(name)
    except Exception as e:  # the peer package is optional: absent or broken, its column stays empty
        print(f"peer {name} unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def launch_sweep(row, q, k, v, ig, fg, dh, names, graphs=False):
    """Time ours at the default chunk size under each LAUNCH_GRID entry in `names`, then the best entry of
    each group together. Each entry's h and gradients must equal the default's (relative L2 < 1e-2: the
    settings change no arithmetic (dden_prefetch included), the split, dqdk_restructured and
    output_restructured only the fp32 summation order) before it is timed. With `graphs` each entry is also timed
    from CUDA graphs, and where every capture worked those times (the kernels' alone: at S = 4096 the eager ones
    follow the host) pick the winners."""
    leaves = [q, k, v, ig, fg]
    ours = lambda: mlstm(q, k, v, ig, fg, backend="triton")  # noqa: E731
    eager, graphed, errs = {}, {}, {}

    def timed(name, overrides):
        print(f"{row['shape']} launch {name} {json.dumps(overrides)}", flush=True)  # names a crash's culprit
        with _launch_overrides(**overrides):
            if overrides:
                errs[name] = max_rel_diff(outputs_and_grads(ours, leaves, dh), ref)
                assert errs[name] < 1e-2, f"launch {name}: relative difference {errs[name]:.1e} from the default"
            eager[name] = fwd_bwd(ours, leaves, dh)()
            if graphs:  # captured under the overrides; the replays run what was captured
                graphed[name] = graphed_fwd_bwd(lambda *x: mlstm(*x, backend="triton"), leaves, dh)
        print(f"{row['shape']} launch {name}: {eager[name]:.3f} ms eager, graphed {graphed.get(name)}, "
              f"max relative difference {errs.get(name, 0.0):.1e}", flush=True)

    ref = outputs_and_grads(ours, leaves, dh)
    timed("default", {})
    for name in names:
        timed(name, LAUNCH_GRID[name])
    picked = lambda: graphed if graphs and None not in graphed.values() else eager  # noqa: E731
    best = {}
    for group in dict.fromkeys(n.split(":")[0] for n in names):
        winner = min((n for n in names if n.startswith(group + ":")), key=picked().get)
        if picked()[winner] < picked()["default"]:
            assert not set(best) & set(LAUNCH_GRID[winner]), "LAUNCH_GRID groups must set disjoint keys"
            best.update(LAUNCH_GRID[winner])
    if best and best not in [LAUNCH_GRID[n] for n in names]:
        timed("best", best)
    times = picked()
    name = min(times, key=times.get)
    row["launch_sweep"] = {"ms": eager, "max_rel_diff": errs, "best": name, "picked_by": "graphed" if times is graphed
                           else "eager", "best_overrides": best if name == "best" else LAUNCH_GRID.get(name, {})}
    if graphs:
        row["launch_sweep"]["graphed_ms"] = graphed


def bench_shape(B, NH, S, D, chunks, peers, results, state_blocks=(), launch_names=(), graphs=False,
                compiled_mixer=False, baselines=()):
    (q, k, v, ig, fg), og, dh, _ = make(B, NH, S, D)
    leaves = [q, k, v, ig, fg]
    row = {"shape": (B, NH, S, D)}
    if launch_names:
        launch_sweep(row, q, k, v, ig, fg, dh, launch_names, graphs)
    for tile in state_blocks:  # the sequential state kernels' tile edge, at the default chunk size
        t = fwd_bwd(lambda tile=tile: mlstm(q, k, v, ig, fg, backend="triton", state_block=tile), leaves, dh)()
        row[f"ours_tile{tile}"] = t
        print(f"{(B, NH, S, D)} ours state_block={tile}: {t:.3f} ms", flush=True)
    for L in chunks:
        t = fwd_bwd(lambda L=L: mlstm(q, k, v, ig, fg, backend="triton", chunk_size=L), leaves, dh)()
        row[f"ours_L{L}"] = t
        fl, by = flops_bytes(B, NH, S, D, L)
        row[f"ours_L{L}_tflops"] = fl / t / 1e9  # t in ms
        row[f"ours_L{L}_GBps"] = by / t / 1e6  # the fewest bytes the algorithm must move, over the time taken
        row[f"ours_L{L}_floor_ms"] = max(fl / PEAK_TFLOPS / 1e9, by / PEAK_TBPS / 1e9)
        print(f"{(B, NH, S, D)} ours L={L}: {t:.3f} ms ({fl / t / 1e9:.0f} TFLOP/s, "
              f"{by / t / 1e6:.0f} GB/s of the byte floor)", flush=True)
        if graphs:  # at S = 4096 the eager times follow the host, so the chunk size is chosen on these
            t = graphed_fwd_bwd(lambda *x, L=L: mlstm(*x, backend="triton", chunk_size=L), leaves, dh)
            if t is not None:
                row[f"ours_L{L}_graphed"] = t
                print(f"{(B, NH, S, D)} ours L={L}, graphed: {t:.3f} ms", flush=True)
    _, _, _, seg8 = make(B, NH, S, D, docs=8)
    docs8 = lambda: mlstm(q, k, v, ig, fg, segment_ids=seg8, backend="triton")  # noqa: E731
    row["ours_8docs"] = fwd_bwd(docs8, leaves, dh)()
    ours = lambda: mlstm(q, k, v, ig, fg, backend="triton")  # noqa: E731
    row["ours_default"] = fwd_bwd(ours, leaves, dh)()
    row["ours_host"] = steady_host_ms(cleared_call(ours, leaves, dh))
    if baselines:
        compare_baselines(row, baselines, leaves, dh, seg8, graphs)
    for name, kern in peers.items():
        if kern is None:
            continue
        try:
            peer = lambda kern=kern: kern(q, k, v, ig, fg, chunk_size=64)  # noqa: E731
            row[name] = fwd_bwd(peer, leaves, dh)()
            if name == "mlstm_limit_chunk":
                row["limit_chunk_host"] = steady_host_ms(cleared_call(peer, leaves, dh))
        except Exception as e:  # a peer that fails to compile on this triton is reported, not fatal
            print(f"{name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    if graphs:  # ours and limit_chunk without host overhead (S = 4096 is host-bound eagerly: docs/benchmarks.md)
        graphed = {"ours_graphed": lambda *x: mlstm(*x, backend="triton"),
                   # the segment ids are fixed inputs of the graph; tells the packed path's kernel time from
                   # its extra host work (its eager time grows most at the small shapes)
                   "ours_8docs_graphed": lambda *x: mlstm(*x, segment_ids=seg8, backend="triton")}
        if peers.get("mlstm_limit_chunk") is not None:
            graphed["limit_chunk_graphed"] = lambda *x: peers["mlstm_limit_chunk"](*x, chunk_size=64)
        for name, fn in graphed.items():
            t = graphed_fwd_bwd(fn, leaves, dh)
            if t is not None:
                row[name] = t
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    row["sdpa_causal"] = fwd_bwd(sdpa, [q, k, v], dh)()
    row["flex_swa512_4sinks"] = fwd_bwd(lambda: attention(q, k, v, window=512, n_sinks=4, backend="flex"),
                                        [q, k, v], dh)()

    def mixer(q, k, v, ig, fg, og):
        # as the student's HybridMixer runs it on a GPU: FlexAttention SWA + sinks, our mLSTM, and the fused
        # output mix (xdistill_kernels.gate_mix, one kernel each way; it writes the (B, S, NH, D) layout o_proj
        # reads). The sigmoid stands for gate_activations, which computes o together with the mLSTM gates.
        swa = attention(q, k, v, window=512, n_sinks=4)
        return gate_mix(torch.sigmoid(og), mlstm(q, k, v, ig, fg, backend="triton"), swa)

    mixer_in = leaves + [og]
    row["hybrid_mixer"] = fwd_bwd(lambda: mixer(*mixer_in), mixer_in, dh)()
    if graphs:  # the whole mixer from CUDA graphs: its kernels' time without the host's
        t = graphed_fwd_bwd(mixer, mixer_in, dh)
        if t is not None:
            row["hybrid_mixer_graphed"] = t
    if compiled_mixer:  # as the trainer runs it: compile_blocks compiles each decoder block, mixer included
        try:
            compiled = torch.compile(mixer, dynamic=False)
            row["hybrid_mixer_compiled"] = fwd_bwd(lambda: compiled(*mixer_in), mixer_in, dh)()
        except Exception as e:  # reported, not fatal: the eager columns stand without it
            print(f"compiled mixer failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    results.append(row)


def cleared_call(fn, leaves, dh):
    """One eager forward+backward of fn() as a closure that clears the leaves' gradients first: else each call's
    gradients are added to the last ones', 3 extra q-sized elementwise kernels that the timed runs (grad_to_none)
    don't have."""
    def call():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(dh)

    return call


def ours_call(leaves, dh, **kwargs):
    """cleared_call of ours on leaves (q, k, v, igate, fgate)."""
    return cleared_call(lambda: mlstm(*leaves, backend="triton", **kwargs), leaves, dh)


def profile_ours(B, NH, S, D, docs=0):
    """Per-kernel CUDA time of one forward+backward of ours (torch.profiler), printed as a table, after the
    host's time per call: where it is not well below the GPU's, launches and torch glue bound the call. The host
    time is split into the launch path (CompiledLaunch's, and JITFunction.run's where a launch takes it: binding,
    cache lookup, the launcher's C call) and the rest (torch ops, autograd, Python), and a second table lists the
    host time of each torch op."""
    leaves, _, dh, seg = make(B, NH, S, D, docs=docs)
    call = ours_call(leaves, dh, segment_ids=seg)
    label = f"{(B, NH, S, D)}" + (f", {docs} docs" if docs else "")
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    patched = [(triton.runtime.jit.JITFunction, "run"), (CompiledLaunch, "_launch")]
    originals = [getattr(cls, name) for cls, name in patched]
    in_launch, depth = [], [0]

    def timed(original):
        def method(self, *args, **kwargs):  # outermost call only: _launch calls JITFunction.run on a first launch
            depth[0] += 1
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    in_launch[-1] += time.perf_counter() - start
        return method

    host = []
    for (cls, name), original in zip(patched, originals):
        setattr(cls, name, timed(original))
    try:
        for _ in range(20):  # time to issue one call while a ~30 ms kernel keeps the GPU busy: a hidden host sync
            torch.cuda._sleep(50_000_000)  # (it would show as ~30 ms here)
            in_launch.append(0.0)
            start = time.perf_counter()
            call()
            host.append(time.perf_counter() - start)
            torch.cuda.synchronize()
    finally:
        for (cls, name), original in zip(patched, originals):
            setattr(cls, name, original)
    print(f"host time to issue one forward+backward {label}: median {statistics.median(host) * 1e6:.0f} us, "
          f"of which the kernels' launch path {statistics.median(in_launch) * 1e6:.0f} us", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(f"profile {label}, 5 iterations:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(f"host time by op {label}, 5 iterations:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def trace_ours(B, NH, S, D, chunks, out):
    """Chrome trace (chrome://tracing or ui.perfetto.dev) of 5 eager forward+backward calls of ours at each chunk
    size, with one document and with 8, to OUT/trace_BxNHxSxD_L{L}[_8docs].json: the gaps between kernels on the
    GPU rows show where the host holds the GPU back, and the CPU rows what it is doing then. Asked for by the
    twelfth session: at (1, 32, 4096, 128), L = 128 took 1.49 ms eager for 0.68 ms of kernels (graphed), L = 64
    0.23 ms above its kernels."""
    leaves, _, dh, seg = make(B, NH, S, D, docs=8)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for L, docs in [(L, docs) for L in chunks for docs in (0, 8)]:
        call = ours_call(leaves, dh, chunk_size=L, segment_ids=seg if docs else None)
        for _ in range(3):  # compile and warm up outside the trace
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        path = os.path.join(out, f"trace_{B}x{NH}x{S}x{D}_L{L}" + ("_8docs" if docs else "") + ".json")
        prof.export_chrome_trace(path)
        print(f"trace {(B, NH, S, D)} L={L} docs={docs}: {path}", flush=True)


def bench_step(results):
    B, NH, D = 64, 32, 128
    state = mlstm_fresh_state(B, NH, D, D, "cuda")
    state = (torch.randn_like(state[0]), torch.rand_like(state[1]), torch.randn_like(state[2]))
    x = [torch.randn(B, NH, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    gates = [torch.randn(B, NH, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    t = do_bench(lambda: mlstm_step(*x, *gates, state), warmup=50, rep=200, return_mode="median")
    nbytes = 2 * (state[0].numel() + state[1].numel() + state[2].numel()) * 4 + 4 * B * NH * D * 2
    print(f"step B={B} NH={NH} D={D}: {t * 1e3:.1f} us, {nbytes / t / 1e6:.0f} GB/s", flush=True)
    results.append({"step": (B, NH, D), "ms": t, "GBps": nbytes / t / 1e6})


def write_markdown(path, results, checks, device):
    cols = ["ours_default", "ours_8docs", "mlstm_limit_chunk", "mlstm_xl_chunk", "sdpa_causal",
            "flex_swa512_4sinks", "hybrid_mixer"]
    if any("ours_graphed" in r for r in results):
        cols += ["ours_graphed", "ours_8docs_graphed", "limit_chunk_graphed"]
    cols += [c for c in ("hybrid_mixer_graphed", "hybrid_mixer_compiled", "ours_host", "limit_chunk_host")
             if any(c in r for r in results)]
    lines = [f"Card: {device}; torch {torch.__version__}, triton {triton.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| (B, NH, S, D) | " + " | ".join(cols) + " | limit_chunk / ours | SDPA / mixer |",
             "|---" * (len(cols) + 3) + "|"]
    for r in results:
        if "shape" not in r:
            continue
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in cols]
        lc = r.get("mlstm_limit_chunk")
        ratio = f"{lc / r['ours_default']:.2f}x" if lc else "-"
        lines.append(f"| {r['shape']} | " + " | ".join(cells) + f" | {ratio} | "
                     f"{r['sdpa_causal'] / r['hybrid_mixer']:.2f}x |")
    for col, what in (("hybrid_mixer_graphed", "replayed from CUDA graphs"),
                      ("hybrid_mixer_compiled", "torch.compile, as compile_blocks runs it")):
        if any(col in r for r in results):
            lines += ["", f"SDPA / mixer {what}: " + ", ".join(
                f"{r['shape']}: {r['sdpa_causal'] / r[col]:.2f}x" for r in results if col in r)]
    if any("ours_host" in r for r in results):
        lines += ["", "ours_host, limit_chunk_host: host time (ms) to issue one eager forward+backward in steady "
                  "state (steady_host_ms); where it exceeds the graphed time, the eager column measures the host."]
    if any("ours_graphed" in r and "limit_chunk_graphed" in r for r in results):
        lines += ["", "Replayed from CUDA graphs (no host work per call), limit_chunk / ours: " + ", ".join(
            f"{r['shape']}: {r['limit_chunk_graphed'] / r['ours_graphed']:.2f}x"
            for r in results if "ours_graphed" in r and "limit_chunk_graphed" in r)]
    swept = [r for r in results if any(k.startswith("ours_L") for k in r)]  # none with --chunks ""
    if swept:
        lines += ["", "Chunk-size sweep (ours, ms; TFLOP/s of our algorithm; "
                  "floor = max(FLOPs / 790 TFLOP/s, bytes / 3 TB/s)):", ""]
    for r in swept:
        if "shape" in r:
            sweep = [k for k in r if k.startswith("ours_L") and k.count("_") == 1]
            lines.append(f"- {r['shape']}: " + ", ".join(
                f"L={k[6:]}: {r[k]:.3f} ms ({r[k + '_tflops']:.0f} TFLOP/s, {r[k + '_GBps']:.0f} GB/s, "
                f"floor {r[k + '_floor_ms']:.3f} ms" + (f", graphed {r[k + '_graphed']:.3f} ms" if k + "_graphed" in r
                                                       else "") + ")"
                for k in sweep))
    tiles = [r for r in results if any(k.startswith("ours_tile") for k in r)]
    if tiles:
        lines += ["", "State-kernel tile sweep (ours at the default chunk size, ms):", ""]
        for r in tiles:
            lines.append(f"- {r['shape']}: " + ", ".join(f"{k[9:]}: {r[k]:.3f}" for k in r
                                                         if k.startswith("ours_tile")))
    sweeps = [r for r in results if "launch_sweep" in r]
    if sweeps:
        names = list(dict.fromkeys(n for r in sweeps for n in r["launch_sweep"]["ms"]))
        lines += ["", "Launch sweep (ours at the default chunk size, ms, eager, or eager / graphed where timed from "
                  "CUDA graphs too, which then pick the fastest; one group of settings changed at a time, "
                  "best = the best entry of each group together; kernels/benchmarks/bench_mlstm.py LAUNCH_GRID):",
                  "", "| (B, NH, S, D) | " + " | ".join(names) + " | fastest | its overrides | max rel. diff |",
                  "|---" * (len(names) + 4) + "|"]
        for r in sweeps:
            sw = r["launch_sweep"]
            graphed = sw.get("graphed_ms", {})
            cells = [(f"{sw['ms'][n]:.3f}" + (f" / {graphed[n]:.3f}" if graphed.get(n) is not None else ""))
                     if n in sw["ms"] else "-" for n in names]
            picked = graphed if sw["picked_by"] == "graphed" else sw["ms"]
            speedup = picked["default"] / picked[sw["best"]]
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + f" | {sw['best']} ({speedup:.2f}x) | "
                         f"`{json.dumps(sw['best_overrides'])}` | {max(sw['max_rel_diff'].values(), default=0):.1e} |")
    ab = [r for r in results if "ab" in r]
    if ab:
        cases = list(dict.fromkeys(c for r in ab for c in r["ab"]["ours"]))
        lines += ["", "A/B against --baseline copies of kernels/ (ms, each the median of 3 rounds timed in "
                  "alternation; in brackets baseline / ours, > 1: ours faster):", "",
                  "| (B, NH, S, D) | kernels | " + " | ".join(cases) + " |", "|---" * (len(cases) + 2) + "|"]
        for r in ab:
            ours = r["ab"]["ours"]
            for name, t in r["ab"].items():
                cells = [(f"{t[c]:.3f}" + ("" if name == "ours" else f" ({t[c] / ours[c]:.3f})")) if c in t else "-"
                         for c in cases]
                lines.append(f"| {r['shape']} | {name} | " + " | ".join(cells) + " |")
    for r in results:
        if "step" in r:
            lines.append(f"- step kernel {r['step']} (B, NH, D): {r['ms'] * 1e3:.1f} us, "
                         f"{r['GBps']:.0f} GB/s")
    lines += ["", "Correctness (relative L2 error vs float32 reference): " + "; ".join(
        f"{c['check']}: " + ", ".join(f"{k}={v:.1e}" for k, v in c.items() if k != "check") for c in checks)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="all", help="'all' or indices into SHAPES, e.g. 0,3")
    ap.add_argument("--chunks", default="64,128", help="chunk sizes of ours to sweep")
    ap.add_argument("--state-blocks", default="", help="state-kernel tile edges of ours to sweep, e.g. 16,32,64")
    ap.add_argument("--launch-sweep", nargs="?", const="all", default="",
                    help="time ours under LAUNCH_GRID (all, or comma-separated names) and report the best per shape")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print per-kernel times of ours at each shape")
    ap.add_argument("--graphs", action="store_true",
                    help="also time ours and limit_chunk replayed from CUDA graphs (no host overhead per call)")
    ap.add_argument("--compiled-mixer", action="store_true",
                    help="also time the hybrid mixer under torch.compile, as compile_blocks runs it in training")
    ap.add_argument("--trace", action="store_true",
                    help="save a Chrome trace of ours at each chunk size of --chunks and each shape to --out")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR",
                    help="also time the mlstm of another copy of kernels/ beside ours, alternating, 1 and 8 documents "
                         "(and graphed with --graphs): an A/B of a change on one card. DIR from e.g. "
                         "`git archive COMMIT kernels | tar -x -C /tmp/COMMIT` is /tmp/COMMIT/kernels; repeatable")
    args = ap.parse_args()
    baselines = [load_baseline(spec) for spec in args.baseline]
    launch_names = list(LAUNCH_GRID) if args.launch_sweep == "all" else [n for n in args.launch_sweep.split(",") if n]
    unknown = set(launch_names) - set(LAUNCH_GRID)
    if unknown:
        ap.error(f"--launch-sweep: unknown names {sorted(unknown)}; known: {', '.join(LAUNCH_GRID)}")
    device = torch.cuda.get_device_name()
    checks, results = [], []
    check_correctness(checks)
    peers = {} if args.no_peers else {"mlstm_limit_chunk": peer_kernel("chunkwise--triton_limit_chunk"),
                                      "mlstm_xl_chunk": peer_kernel("chunkwise--triton_xl_chunk")}
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    chunks = [int(c) for c in args.chunks.split(",") if c]
    for shape in shapes:
        if args.profile:  # one document, then 8: the packed path's extra cost per kernel
            profile_ours(*shape)
            profile_ours(*shape, docs=8)
        if args.trace:
            trace_ours(*shape, chunks, args.out)
        try:
            bench_shape(*shape, chunks, peers, results, [int(t) for t in args.state_blocks.split(",") if t],
                        launch_names, args.graphs, args.compiled_mixer, baselines)
        except Exception:  # reported, and the next shapes still run: the thirteenth session lost its last shape
            # to an out-of-memory error left behind by a failed compile and graph capture in the shape before
            print(f"{shape} failed:\n{traceback.format_exc()}", flush=True)
        # CUDA graphs and their memory pools die with their last reference, which reference cycles (closures) can
        # hold past the shape. In the sixteenth session (H200) 134 GiB stayed reserved after (1, 32, 65536, 128),
        # one capture there failed and the next two shapes ran out of memory; that cycles held it is a guess, not
        # yet checked on a GPU. Collecting costs nothing either way.
        gc.collect()
        torch.cuda.empty_cache()
        write_markdown(os.path.join(args.out, "bench_mlstm.md"), results, checks, device)
    bench_step(results)
    write_markdown(os.path.join(args.out, "bench_mlstm.md"), results, checks, device)
    with open(os.path.join(args.out, "bench_mlstm.json"), "w") as f:
        json.dump({"device": device, "results": results, "checks": checks}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
