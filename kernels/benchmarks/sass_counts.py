"""Static code counts of the mLSTM kernels, offline: registers, spill bytes, and SASS instructions and local-memory
(spill) instructions per code region, for sm_90a, without a GPU.

    pip install --no-deps --target /tmp/t36 triton==3.6.0        # the GPU image's triton (ships ptxas, nvdisasm)
    PYTHONPATH=/tmp/t36:. python kernels/benchmarks/sass_counts.py 16384x128x128x8 --overrides '{"doc_branch": true}'

Each SHAPE is S x D x L x documents (0: one document, no ids) of a (1, 2, S, D) bf16 forward + backward; the
kernels compile through bench_host.py's stand-in CUDA driver. ptxas reports the registers and the bytes of spill
stores; nvdisasm's listing gives the instructions (STL / LDL: spill stores / loads). The listing is cut into
regions at its branch labels; regions of >= 300 instructions, or with spills, are listed. Where a kernel branches
into alternative bodies (doc_branch: the document code and the one-document code), each body is one or two such
regions, so the counts show what a program on either path executes: the loops in these kernels are unrolled
(tl.static_range), so a region's static count is its dynamic count. What this cannot tell: time. The counts
ranked the sub-tile variants correctly in the dv launch but not their size (docs/benchmarks.md, eighteenth
session); a change is timed on a GPU before it becomes a default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_host  # noqa: E402  (the stand-in driver and the host call)

SHOWN = ("DO_DQDK", "DO_DV", "DV_SUBTILES", "DOC_BRANCH", "OUT_RESTRUCTURED", "SEGMENTED", "num_warps")
_ADDRESS = re.compile(r"/\*[0-9a-f]{4,}\*/")


def regions(listing: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The instruction lines of an nvdisasm listing and its regions: [start, end) instruction indices between
    consecutive branch labels."""
    lines, marks = [], []
    for line in listing.split("\n"):
        if re.match(r"\s*\.L_x_\d+:", line):
            marks.append(len(lines))
        if _ADDRESS.search(line):
            lines.append(line)
    bounds = sorted({0, *marks, len(lines)})
    return lines, list(zip(bounds, bounds[1:]))


def spills(lines: list[str]) -> tuple[int, int]:
    """(STL, LDL) instruction counts of SASS lines."""
    return sum(" STL" in line for line in lines), sum(" LDL" in line for line in lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="S x D x L x documents, e.g. 16384x128x128x8")
    parser.add_argument("--kernels", default="_fwd_output,_bwd_grads", help="comma-separated kernel names")
    parser.add_argument("--overrides", default="{}", help="_launch_overrides arguments as JSON")
    args = parser.parse_args()
    if not triton.__version__.startswith("3.6."):
        raise SystemExit(f"sass_counts.py stands in for triton 3.6's CUDA driver; this is triton {triton.__version__}")
    driver.set_active(bench_host._StubDriver())
    import xdistill_kernels.launch as launch_module
    from xdistill_kernels import chunkwise_triton as ct
    from xdistill_kernels import mlstm

    launch_module._CUDA_TENSORS_ONLY = False  # CPU tensors: the compiled kernels are kept (bench_host.py)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    overrides = json.loads(args.overrides)
    for shape in args.shapes:
        S, D, L, docs = map(int, shape.split("x"))
        with ct._launch_overrides(**overrides) if overrides else contextlib.nullcontext():
            bench_host.host_call(mlstm, S, D, L, docs)()
        print(f"## S={S} D={D} L={L} documents={docs} overrides={overrides}")
        for name in args.kernels.split(","):
            launch = getattr(ct, name)
            for key, (kernel, _) in launch._compiled.items():
                meta = dict(k for k in key[1:] if isinstance(k, tuple) and len(k) == 2 and isinstance(k[0], str))
                if meta.get("L", L) != L or meta.get("DQK", D) != D or meta.get("HAS_DOC", bool(docs)) != bool(docs):
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
                    with open(ptx, "w") as f:
                        f.write(kernel.asm["ptx"])
                    report = subprocess.run([os.path.join(tools, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o",
                                             cubin], capture_output=True, text=True, check=True).stderr
                    listing = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True,
                                             text=True, check=True).stdout
                registers = re.findall(r"Used (\d+) registers", report)
                spill_bytes = re.findall(r"(\d+) bytes spill stores", report)
                lines, cuts = regions(listing)
                tag = ", ".join(f"{k}={v}" for k, v in meta.items() if k in SHOWN)
                print(f"{name} ({tag}): {registers[0]} registers, {spill_bytes[0]} B spill stores, "
                      f"{len(lines)} instructions, STL / LDL {'/'.join(map(str, spills(lines)))}")
                for start, end in cuts:
                    stl, ldl = spills(lines[start:end])
                    if end - start >= 300 or stl or ldl:
                        print(f"    [{start}, {end}): {end - start} instructions, STL / LDL {stl}/{ldl}")
            launch._compiled.clear()


if __name__ == "__main__":
    main()
