"""Launch sweep of the gate-gradient kernels (`_bwd_chunk_sums` then `_bwd_gates`), one document and 8, on one
GPU (median us).

    python kernels/benchmarks/bench_gates.py --out $OUT      # writes bench_gates.md

`_bwd_gates` runs one program per block of BS positions of each (batch, head) row, all in parallel; each sums
what its block's suffix sums carry in from the per-chunk sums of `_bwd_chunk_sums`, timed with it. Until the
eighteenth session one program walked each row, a chain of per-block steps. This times the two, replayed from
CUDA graphs, over block sizes and warps of `_bwd_gates` with the inputs the backward passes at L = 128 (fp32
q.dq, k.dk and forget gates, bf16 gate gradients, int64 segment ids), after checking that every setting gives
the gradients of the default (BS = 512, 4 warps) to relative L2 < 1e-3: the blocks only reorder fp32 sums,
which flips the bf16 rounding of a few elements by one ulp (2^-8 relative).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os

import torch
import triton
from bench_mlstm import packed_segment_ids  # this script's folder, as when run by path
from triton.testing import do_bench_cudagraph
from xdistill_kernels.chunkwise_triton import _bwd_chunk_sums, _bwd_gates

SHAPES = [(1, 32, 65536), (1, 32, 16384), (2, 9, 16384)]  # (B, NH, S): issue 3's long shapes
BLOCKS, WARPS = (256, 512, 1024, 2048), (2, 4, 8, 16)
BASELINE = (512, 4)  # _launch_config's bwd_gates
L = 128  # the chunk size at these shapes


def inputs(B, NH, S, docs):
    g = torch.Generator(device="cuda").manual_seed(0)
    qdq, kdk, fg = (torch.randn(B, NH, S, device="cuda", generator=g) for _ in range(3))
    seg = packed_segment_ids(B, S, docs, g) if docs > 1 else None
    return qdq, kdk, fg, seg


def gates(qdq, kdk, fg, seg, block, warps, out=None):
    """_bwd_chunk_sums then _bwd_gates as _MLSTMChunkwise.backward launches them (no final state): (dig, dfg),
    written into `out` if given (the graph-replayed timing allocates nothing per launch)."""
    B, NH, S = qdq.shape
    NC = triton.cdiv(S, L)
    dig, dfg, dbc = out or (*(torch.empty(B, NH, S, device="cuda", dtype=torch.bfloat16) for _ in range(2)),
                            torch.empty(B * NH, NC, 2, device="cuda"))
    seg_arg = seg if seg is not None else qdq
    _bwd_chunk_sums[(NC, B * NH)](qdq, kdk, seg_arg, dbc, NH, S, NC, L=L, HAS_DOC=seg is not None, num_warps=4,
                                  num_stages=3)
    _bwd_gates[(triton.cdiv(S, block), B * NH)](qdq, kdk, dbc, fg, seg_arg, qdq, dig, dfg, NH, S, NC, L=L, BS=block,
                                                BC=256, HAS_DOC=seg is not None, HAS_DFINAL=False, num_warps=warps,
                                                num_stages=3)
    return dig, dfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lines = [f"Card: {torch.cuda.get_device_name()}; `_bwd_chunk_sums` + `_bwd_gates`, median us (relative to "
             "BS = 512, 4 warps)",
             "", "| (B, NH, S) | docs | " + " | ".join(f"BS {b}, {w} warps" for b, w in itertools.product(
                 BLOCKS, WARPS)) + " |", "|---" * (len(BLOCKS) * len(WARPS) + 2) + "|"]
    for (B, NH, S), docs in itertools.product(SHAPES, (1, 8)):
        x = inputs(B, NH, S, docs)
        ref = gates(*x, *BASELINE)[1].float()
        times = {}
        out = (*gates(*x, *BASELINE), torch.empty(B * NH, triton.cdiv(S, L), 2, device="cuda"))
        for block, warps in itertools.product(BLOCKS, WARPS):
            dfg = gates(*x, block, warps)[1].float()
            err = ((dfg - ref).norm() / ref.norm()).item()
            assert err < 1e-3, f"BS {block}, {warps} warps: relative difference {err:.1e}"
            # replayed from a CUDA graph: the kernel takes ~40-450 us, about what the host needs to launch it
            call = functools.partial(gates, *x, block, warps, out)
            times[block, warps] = do_bench_cudagraph(call, rep=100, return_mode="median") * 1e3
            print(f"({B}, {NH}, {S}) docs={docs} BS={block} warps={warps}: {times[block, warps]:.1f} us", flush=True)
        base = times[BASELINE]
        lines.append(f"| ({B}, {NH}, {S}) | {docs} | " + " | ".join(
            f"{t:.1f} ({t / base:.2f})" for t in times.values()) + " |")
        with open(os.path.join(args.out, "bench_gates.md"), "w") as f:  # after every row: a cut-off run keeps it
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
