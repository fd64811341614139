"""Launch sweep of the gate-gradient kernel alone (`_bwd_gates`), one document and 8, on one GPU (median us).

    python kernels/benchmarks/bench_gates.py --out $OUT      # writes bench_gates.md

`_bwd_gates` runs one program per block of BS positions of each (batch, head) row, all in parallel; each sums
what its block's suffix sums carry in from the per-chunk sums `_bwd_grads` leaves (here computed by
`chunk_sums`). Until the eighteenth session one program walked each row, a chain of per-block steps. This times
it, replayed from CUDA graphs, over block sizes and warps with the inputs the backward passes at L = 128 (fp32
q.dq, k.dk and forget gates, bf16 gate gradients, int64 segment ids), after checking that every setting gives
the gradients of the default (BS = 1024, 8 warps) to relative L2 < 1e-3: the blocks only reorder fp32 sums,
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
from xdistill_kernels.chunkwise_triton import _bwd_gates

SHAPES = [(1, 32, 65536), (1, 32, 16384), (2, 9, 16384)]  # (B, NH, S): issue 3's long shapes
BLOCKS, WARPS = (256, 512, 1024, 2048), (2, 4, 8, 16)
BASELINE = (1024, 8)  # _launch_config's bwd_gates
L = 128  # the chunk size at these shapes


def chunk_sums(qdq, kdk, seg):
    """(B*NH, NC, 2) fp32 per-chunk sums as _bwd_grads stores them (_store_chunk_db): q.dq - k.dk summed over
    the chunk's positions before its first document start, and whether one starts in it."""
    B, NH, S = qdq.shape
    NC = -(-S // L)
    db = torch.nn.functional.pad(qdq - kdk, (0, NC * L - S)).view(B, NH, NC, L)
    starts = torch.zeros(B, NC * L, dtype=torch.bool, device=qdq.device)
    if seg is not None:
        starts[:, 1:S] = seg[:, 1:] != seg[:, :-1]
    starts = starts.view(B, 1, NC, L)
    in_first = starts.cumsum(-1) == 0
    sums = (db * in_first).sum(-1)
    flags = starts.any(-1).expand(B, NH, NC).float()
    return torch.stack([sums, flags], -1).view(B * NH, NC, 2).contiguous()


def inputs(B, NH, S, docs):
    g = torch.Generator(device="cuda").manual_seed(0)
    qdq, kdk, fg = (torch.randn(B, NH, S, device="cuda", generator=g) for _ in range(3))
    seg = packed_segment_ids(B, S, docs, g) if docs > 1 else None
    return qdq, kdk, chunk_sums(qdq, kdk, seg), fg, seg


def gates(qdq, kdk, dbc, fg, seg, block, warps, out=None):
    """One launch of _bwd_gates as _MLSTMChunkwise.backward makes it (no final state): (dig, dfg), written into
    `out` if given (the graph-replayed timing allocates nothing per launch)."""
    B, NH, S = qdq.shape
    dig, dfg = out or (torch.empty(B, NH, S, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    _bwd_gates[(triton.cdiv(S, block), B * NH)](qdq, kdk, dbc, fg, seg if seg is not None else qdq, qdq, dig, dfg,
                                                NH, S, dbc.shape[1], L=L, BS=block, BC=256, HAS_DOC=seg is not None,
                                                HAS_DFINAL=False, num_warps=warps, num_stages=3)
    return dig, dfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    lines = [f"Card: {torch.cuda.get_device_name()}; `_bwd_gates` alone, median us (relative to BS = 1024, 8 warps)",
             "", "| (B, NH, S) | docs | " + " | ".join(f"BS {b}, {w} warps" for b, w in itertools.product(
                 BLOCKS, WARPS)) + " |", "|---" * (len(BLOCKS) * len(WARPS) + 2) + "|"]
    for (B, NH, S), docs in itertools.product(SHAPES, (1, 8)):
        x = inputs(B, NH, S, docs)
        ref = gates(*x, *BASELINE)[1].float()
        times = {}
        out = gates(*x, *BASELINE)
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
