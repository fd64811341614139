"""Host time of one eager mLSTM forward + backward, offline: no GPU, the launches stubbed (median us).

    pip install --no-deps --target /tmp/t36 triton==3.6.0        # the GPU image's triton (imports on CPU)
    PYTHONPATH=/tmp/t36:. python kernels/benchmarks/bench_host.py --baseline old=/tmp/old/kernels

At S = 4096 the eager forward + backward is bound by the host: Python, torch ops, autograd, and Triton's launch
path. This script times that path on any CPU. Triton 3.6 compiles the real kernels for sm_90a (ptxas ships with
it). A stand-in CUDA driver then reports device 0 and stream 0 and loads no binary. Its launcher is the real
CudaLauncher's Python, with the C launch replaced by a loop that reads each tensor's data_ptr, as the C launch
does. The tensors are small CPU tensors, so torch's ops are dispatched and allocated but cost no bandwidth.

What it leaves out: the CUDA driver's calls, i.e. the launch itself (cuLaunchKernelEx, ~5-16 us per launch in
profiles) and, where a launch passes tensors (JITFunction.run's), one cuPointerGetAttribute per pointer argument;
and the CUDA caching allocator. The launch module's CUDA-only check is switched off here (CPU tensors). So it
ranks host-side changes, e.g. ours against a --baseline copy of kernels/ timed in alternation in one process, but
it does not give the device's host time. The device's figure is the eager
column of bench_mlstm.py wherever that exceeds the graphed one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver, CudaLauncher
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mlstm import cleared_call, load_baseline  # noqa: E402  (its A/B's NAME=DIR copies and call)


class _StubUtils:
    """Device queries and binary loading of the stand-in driver: an H100's limits, no module loaded."""

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 64, 0, 1024  # module, function, registers, spills, max threads per block

    def get_device_properties(self, device):
        return dict(max_shared_mem=232448, multiprocessor_count=132, max_num_regs=65536, warpSize=32)


class _StubLauncher(CudaLauncher):
    """CudaLauncher's Python path (scratch allocation, argument order) with the C launch replaced."""

    def __init__(self, src, metadata):
        self.num_ctas = getattr(metadata, "num_ctas", 1)
        self.global_scratch_size = metadata.global_scratch_size
        self.global_scratch_align = metadata.global_scratch_align
        self.profile_scratch_size = metadata.profile_scratch_size
        self.profile_scratch_align = metadata.profile_scratch_align
        self.launch_cooperative_grid = metadata.launch_cooperative_grid
        self.launch_pdl = metadata.launch_pdl

        def launch(*args):  # the C launch reads each tensor argument's data_ptr()
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    arg.data_ptr()

        self.launch = launch


class _StubDriver(CudaDriver):
    """Triton's CUDA driver on a machine without one: sm_90 target, device 0, stream 0, stub launches."""

    def __init__(self):
        self.utils = _StubUtils()
        self.launcher_cls = _StubLauncher
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: 0
        self.get_device_capability = lambda device=0: (9, 0)

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def host_call(mlstm, S, D, chunk_size, docs):
    """One eager forward + backward of `mlstm` at (1, 2, S, D) in bf16 as a closure (gradients cleared first)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, D, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    ig, fg = (torch.randn(1, 2, S, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    dh = torch.randn(1, 2, S, D, generator=g, dtype=torch.bfloat16)
    seg = (torch.arange(S) * docs // S).to(torch.int32)[None].contiguous() if docs else None
    leaves = (q, k, v, ig, fg)
    return cleared_call(lambda: mlstm(*leaves, backend="triton", chunk_size=chunk_size, segment_ids=seg), leaves, dh)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR",
                        help="a copy of kernels/ to time beside ours (repeatable)")
    parser.add_argument("--seq-len", type=int, default=256, help="S of the (1, 2, S, D) inputs (host work barely "
                        "depends on it; the chunk count does not reach the host)")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims D")
    parser.add_argument("--chunks", default="64,128", help="comma-separated chunk sizes L")
    parser.add_argument("--docs", default="0,4", help="comma-separated documents per row (0: one, no ids)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per implementation, alternating")
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    args = parser.parse_args()
    if not triton.__version__.startswith("3.6."):
        raise SystemExit(f"bench_host.py stands in for triton 3.6's CUDA driver; this is triton {triton.__version__}")
    driver.set_active(_StubDriver())
    from xdistill_kernels import mlstm

    impls = {"ours": mlstm, **dict(load_baseline(spec) for spec in args.baseline)}
    print(f"host us per eager forward + backward, (1, 2, {args.seq_len}, D) bf16, median of {args.rounds} rounds "
          f"of {args.calls} calls (min in brackets)")
    print("| D | L | docs | " + " | ".join(impls) + " |")
    print("|---|---|---|" + "---:|" * len(impls))
    for D in map(int, args.head_dims.split(",")):
        for L in map(int, args.chunks.split(",")):
            for docs in map(int, args.docs.split(",")):
                calls = {name: host_call(fn, args.seq_len, D, L, docs) for name, fn in impls.items()}
                for call in calls.values():  # compile (cached on disk after the first run), import, warm up
                    call()
                for module in list(sys.modules.values()):  # every copy's launch module: CPU tensors allowed
                    if hasattr(module, "_CUDA_TENSORS_ONLY"):
                        module._CUDA_TENSORS_ONLY = False
                for call in calls.values():
                    for _ in range(5):
                        call()
                times = {name: [] for name in calls}
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            call()
                        times[name].append((time.perf_counter() - start) / args.calls * 1e6)
                cells = [f"{statistics.median(t):.0f} ({min(t):.0f})" for t in times.values()]
                print(f"| {D} | {L} | {docs} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
