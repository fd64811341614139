"""Stage II throughput: KD with cached logits and with a live teacher, beside plain fine-tuning.

One process, one card, the same batch (B x S tokens of real text), bf16 autocast over fp32 master
weights, AdamW. Each step = forward + backward + optimizer step of the real ``KDModule`` loss (its
training_step minus logging); plain fine-tuning is the teacher itself (transformers, SDPA) trained
with next-token CE. Medians over timed steps after warm-up (the first steps compile FlexAttention and
the Triton kernels). Every KD step gets a fresh segment-id tensor, as from a data loader, so the per-batch
FlexAttention block-mask build is part of the KD time (runs before 2026-11-27's third session reused one).

``--profile`` adds, for plain fine-tuning and the cached-logits KD step, a torch.profiler breakdown of two steps:
GPU time per kernel family (our mLSTM Triton kernels, FlexAttention, SDPA/flash, GEMMs, other Triton,
elementwise/reduction/copy), the step's wall time and the GPU-busy fraction (a low one means the host, not the
GPU, sets the pace), and the 25 costliest kernels.

``--pointwise`` runs the KD rows once per listed backend of the mixer's feature maps, gates and output mix
(``XDistillConfig.pointwise_backend``), in this process on the same student, so fused and unfused compare
side by side. ``--device cpu`` is a smoke run of the same code path (tiny sizes; no memory column; the
Triton backend there needs ``TRITON_INTERPRET=1`` in the environment).

    python runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --pointwise torch triton --out results.md
    python runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --profile --out results.md  # + where time goes
    python runs/benchmarks/bench_stage2.py --device cpu --seq-len 64 --batch 1 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_xdistill.models.configuration_xdistill import POINTWISE_BACKENDS
from lit_xdistill.models.mixer import HybridMixer
from lit_xdistill.modules import KDModule, StudentOptions, topk_logprobs
from lit_xdistill.teachers import TeacherSpec


def _time_steps(step, n_warmup: int, n_timed: int, dev: torch.device) -> tuple[float, float]:
    """Median seconds per step and peak GiB allocated (CUDA; NaN on CPU)."""
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(n_warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n_timed):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")


# Kernel-name patterns per family, first match wins (names as the CUDA profiler reports them).
FAMILIES = (
    ("mLSTM (ours, Triton)", ("_fwd_states", "_fwd_output", "_bwd_dden", "_bwd_states", "_bwd_grads")),
    ("fused mixer ops (ours, Triton)", ("_feature_map", "_gate_act", "_mix_fwd", "_mix_bwd")),
    ("FlexAttention", ("flex", "triton_tem_fused")),
    ("SDPA / flash", ("flash", "fmha", "attention", "cudnn")),
    ("GEMM", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere_", "cublas")),
    ("other Triton (inductor)", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("elementwise / reduction / copy", ("elementwise", "reduce", "copy", "fill", "index", "gather", "scatter",
                                        "cat", "softmax", "log_softmax", "nll", "sum", "where", "topk", "sort")),
)


def _profile(step, dev: torch.device, title: str, n_steps: int = 2) -> str:
    """GPU time per kernel family over ``n_steps`` steps, wall time and busy fraction, costliest kernels."""
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


def _train_step(model_step, params, dev: torch.device):
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=dev.type == "cuda")

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model_step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


PROFILES: list[str] = []  # filled by --profile


def _plain_finetuning(spec: TeacherSpec, batch: dict, args) -> tuple[tuple, tuple]:
    """Time plain fine-tuning of the teacher (what KD is compared with); return its teacher top-k too."""
    plain = spec.load_model(batch["input_ids"].device).float().requires_grad_(True).train()
    dev = batch["input_ids"].device
    step = _train_step(lambda: plain(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
                       list(plain.parameters()), dev)
    row = ("plain fine-tuning (teacher, SDPA)", *_time_steps(step, args.warmup, args.steps, dev))
    if args.profile:
        PROFILES.append(_profile(step, dev, "plain fine-tuning (teacher, SDPA)"))
    with torch.no_grad():  # the teacher top-k once, as the logit cache would hold it
        topk = topk_logprobs(plain(input_ids=batch["input_ids"]).logits.flatten(0, 1), args.top_k)
    return row, topk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m-instruct")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pointwise", nargs="+", default=["auto"], choices=POINTWISE_BACKENDS,
                        help="mixer pointwise backend(s) to time the KD rows with, in this order")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run")
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    parser.add_argument("--profile", action="store_true",
                        help="add a per-kernel-family GPU time breakdown of plain FT and cached-logits KD")
    args = parser.parse_args()
    dev = torch.device(args.device)
    spec = TeacherSpec(args.teacher, dtype="bfloat16")
    tok = spec.load_tokenizer()
    text = open("/usr/share/common-licenses/GPL-3").read() * 20  # real text, not zeros
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = args.batch * args.seq_len
    ids = ids.repeat(n // ids.numel() + 1)[: n + 1]
    batch = {
        "input_ids": ids[:-1].view(args.batch, args.seq_len).to(dev),
        "labels": ids[1:].view(args.batch, args.seq_len).to(dev),
        "segment_ids": torch.zeros(args.batch, args.seq_len, dtype=torch.int32, device=dev),
        "position_ids": torch.arange(args.seq_len, device=dev).expand(args.batch, -1).contiguous(),
    }
    rows = []

    plain_row, (cached_ids, cached_lp) = _plain_finetuning(spec, batch, args)
    rows.append(plain_row)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    module = KDModule(teacher=spec, student=StudentOptions(window=512, n_sinks=4), top_k=args.top_k)
    module.configure_model()
    module.to(dev).train()
    params = [p for p in module.student.parameters() if p.requires_grad]
    cached = {**batch, "topk_ids": cached_ids.view(args.batch, args.seq_len, -1),
              "topk_logprobs": cached_lp.view(args.batch, args.seq_len, -1)}
    mixers = [m for m in module.student.modules() if isinstance(m, HybridMixer)]
    for backend in args.pointwise:
        for mixer in mixers:
            mixer.pointwise_backend = backend
        for name, inputs in (("cached top-k logits", cached), ("live teacher", batch)):
            # a fresh segment-id tensor per step, as the data loader gives: the attention's block mask is
            # cached per tensor, so reusing one would leave its per-batch build out of the timing
            step = _train_step(
                lambda inputs=inputs: module._losses({**inputs, "segment_ids": inputs["segment_ids"].clone()}).loss,
                params, dev)
            rows.append((f"KD, {name}, pointwise {backend}", *_time_steps(step, args.warmup, args.steps, dev)))
            if args.profile and inputs is cached:
                PROFILES.append(_profile(step, dev, f"KD, cached top-k logits, pointwise {backend}"))

    tokens = args.batch * args.seq_len
    base = tokens / rows[0][1]
    lines = [
        f"Stage II throughput, {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, "
        f"teacher {args.teacher}, "
        f"B={args.batch} x S={args.seq_len}, bf16 autocast, median of {args.steps} steps",
        "",
        "| run | step (ms) | tokens/s | vs plain | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sec, mem in rows:
        mem_text = "-" if mem != mem else f"{mem:.1f}"  # NaN on CPU
        lines.append(f"| {name} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {tokens / sec / base:.2f}x | {mem_text} |")
    report = "\n\n".join(["\n".join(lines), *PROFILES])
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
