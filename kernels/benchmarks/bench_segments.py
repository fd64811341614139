"""Per-kernel GPU time of ours under state-segment settings: the measurement behind `_state_segments`' rule.

    python kernels/benchmarks/bench_segments.py --out $OUT                      # the five shapes, G = 1, 2, 4, 8
    python kernels/benchmarks/bench_segments.py --out $OUT --shapes 4 --segments 1,8,16 --carry-blocks 4,8 --docs 8

For each shape of bench_mlstm.SHAPES and each (G, carry block) it runs one forward+backward of
`mlstm(..., backend="triton")` under `_launch_overrides(state_segments=G, carry_block=CB)` and prints and writes
(bench_segments.md) each kernel's CUDA time per call (torch.profiler over 10 calls, after 3 warm ones) and their
sum. The sum, not an eager wall time, is what the rule compares: at S = 4096 the eager call follows the host.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mlstm import SHAPES, make  # noqa: E402
from xdistill_kernels import mlstm  # noqa: E402
from xdistill_kernels.chunkwise_triton import _launch_overrides  # noqa: E402

KERNELS = ("_fwd_states", "_fwd_carry", "_fwd_output", "_bwd_dden", "_bwd_states", "_bwd_carry", "_bwd_grads",
           "_bwd_chunk_sums", "_bwd_gates")


def kernel_times(shape, segments, carry_block, docs, calls=10):
    """{kernel: us per forward+backward} of ours at `shape` = (B, NH, S, D) under the given settings."""
    leaves, _, dh, seg = make(*shape, docs=docs)

    def call():
        for x in leaves:
            x.grad = None
        mlstm(*leaves, backend="triton", segment_ids=seg).backward(dh)

    with _launch_overrides(state_segments=segments, carry_block=carry_block):
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            torch.cuda.synchronize()
    times = dict.fromkeys(KERNELS, 0.0)
    for event in prof.key_averages():
        name = next((k for k in KERNELS if event.key.startswith(k)), None)
        if name:
            times[name] += event.device_time_total / calls
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_segments.md")
    ap.add_argument("--shapes", default="all", help="'all' or indices into bench_mlstm.SHAPES, e.g. 1,4")
    ap.add_argument("--segments", default="1,2,4,8", help="state_segments values to time")
    ap.add_argument("--carry-blocks", default="8", help="carry_block values to time (with G > 1)")
    ap.add_argument("--docs", type=int, default=0, help="documents per row (0: one)")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    header = "| (B, NH, S, D) | G | carry block | " + " | ".join(f"`{k}`" for k in KERNELS) + " | sum |"
    rows = [f"Card: {torch.cuda.get_device_name()}; documents per row: {max(args.docs, 1)}; us per forward+backward",
            "", header, "|---|---:|---:|" + "---:|" * (len(KERNELS) + 1)]
    os.makedirs(args.out, exist_ok=True)
    for shape in shapes:
        for G in (int(g) for g in args.segments.split(",")):
            for CB in [int(b) for b in args.carry_blocks.split(",")][: None if G > 1 else 1]:
                times = kernel_times(shape, G, CB, args.docs)
                rows.append(f"| {shape} | {G} | {CB if G > 1 else '-'} | "
                            + " | ".join(f"{times[k]:.0f}" for k in KERNELS) + f" | {sum(times.values()):.0f} |")
                print(rows[-1], flush=True)
                with open(os.path.join(args.out, "bench_segments.md"), "w") as f:
                    f.write("\n".join(rows) + "\n")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
