"""Where one step of a benchmark spends its time: a torch.profiler breakdown shared by the benchmark scripts.

``profile_step(step, device, title)`` runs ``step()`` under the profiler and returns Markdown: GPU time per kernel
family (our mLSTM Triton kernels, our fused mixer ops, FlexAttention, SDPA/flash, GEMMs, other Triton,
elementwise/reduction/copy), the step's wall time and GPU-busy fraction (a low one means the host, not the GPU,
sets the pace), the costliest kernels, the host side (CUDA runtime/driver calls, aten ops per step, the ops
with the most host time of their own) and, on CUDA, every place where the step makes the host wait for the GPU.
"""

from __future__ import annotations

import time

import torch

# Kernel-name patterns per family, first match wins (names as the CUDA profiler reports them).
FAMILIES = (
    ("mLSTM (ours, Triton)", ("_fwd_states", "_fwd_carry", "_fwd_output", "_bwd_dden", "_bwd_states", "_bwd_carry",
                              "_bwd_grads", "_bwd_chunk_sums", "_bwd_gates", "_step_kernel")),
    ("fused mixer ops (ours, Triton)", ("_feature_map", "_gate_act", "_mix_fwd", "_mix_bwd")),
    ("FlexAttention", ("flex", "triton_tem_fused")),
    ("SDPA / flash", ("flash", "fmha", "attention", "cudnn")),
    ("GEMM", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "cublas")),
    ("other Triton (inductor)", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("elementwise / reduction / copy", ("elementwise", "reduce", "copy", "fill", "index", "gather", "scatter",
                                        "cat", "softmax", "log_softmax", "nll", "sum", "where", "topk", "sort")),
)


def profile_step(step, dev: torch.device, title: str, n_steps: int = 2) -> str:
    """Markdown profile of ``step()`` over ``n_steps`` calls after one warm call (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    step()  # warm (compiled and autotuned already by the timing, but keep the allocator steady)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(n_steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / n_steps
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA") and e.device_time_total > 0]
    per_family: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        family = next((f for f, pats in FAMILIES if any(p.lower() in name for p in pats)), "other")
        per_family[family] = per_family.get(family, 0.0) + e.device_time_total / 1e3 / n_steps
    busy = sum(per_family.values())
    lines = [f"### {title}: {wall_ms:.1f} ms per step, GPU kernels {busy:.1f} ms ({busy / wall_ms:.0%} busy)", "",
             "| kernel family | ms per step | share of step |", "|---|---:|---:|"]
    lines += [f"| {f} | {ms:.1f} | {ms / wall_ms:.0%} |" for f, ms in sorted(per_family.items(), key=lambda x: -x[1])]
    lines += ["", "| kernel | calls per step | ms per step |", "|---|---:|---:|"]
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:25]:
        lines.append(f"| `{e.key[:90]}` | {e.count / n_steps:.0f} | {e.device_time_total / 1e3 / n_steps:.2f} |")
    # The host's side: CUDA driver/runtime calls (launches; synchronising calls block the host until the GPU
    # drains) and the torch ops with the most host time of their own.
    host = [e for e in prof.key_averages() if not (str(getattr(e, "device_type", "")).endswith("CUDA"))]
    runtime = [e for e in host if e.key.startswith(("cuda", "cu"))]
    lines += ["", "| CUDA runtime / driver call (host) | calls per step | host ms per step |", "|---|---:|---:|"]
    for e in sorted(runtime, key=lambda e: -e.self_cpu_time_total)[:8]:
        lines.append(f"| `{e.key}` | {e.count / n_steps:.0f} | {e.self_cpu_time_total / 1e3 / n_steps:.2f} |")
    ops = [e for e in host if e not in runtime]
    n_ops = sum(e.count for e in ops if e.key.startswith("aten::")) / n_steps
    lines += ["", f"{n_ops:,.0f} aten ops per step (host side, every dispatch counted).", "",
              "| op (host time of its own) | calls per step | host ms per step |", "|---|---:|---:|"]
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]:
        lines.append(f"| `{e.key[:90]}` | {e.count / n_steps:.0f} | {e.self_cpu_time_total / 1e3 / n_steps:.2f} |")
    if dev.type == "cuda":
        lines += ["", _sync_sites(step)]
    return "\n".join(lines)


def _sync_sites(step) -> str:
    """Where one step makes the host wait for the GPU: torch's sync debug mode warns at every synchronising
    op; each warning is attributed to the innermost frame of this repo (else of transformers/lightning)."""
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if "/lit_xdistill/" in f.filename or "/kernels/" in f.filename
                or "xdistill_kernels" in f.filename]
        other = [f for f in frames if "/transformers/" in f.filename or "/torch/" in f.filename]
        f = (ours or other or frames)[-1]
        where = f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
        sites[where] = sites.get(where, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():  # restores showwarning and the filters on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    lines = [f"Host-device synchronisations in one step: {sum(sites.values())}", "",
             "| where (innermost frame of ours, else transformers/torch) | syncs per step |", "|---|---:|"]
    lines += [f"| `{w}` | {n} |" for w, n in sorted(sites.items(), key=lambda x: -x[1])]
    return "\n".join(lines)
