"""Stage II throughput: KD with cached logits and with a live teacher, beside plain fine-tuning.

One process, one card, the same batch (B x S tokens of real text), bf16 autocast over fp32 master
weights, AdamW. Each step = forward + backward + optimizer step of the real ``KDModule`` loss (its
training_step minus logging); plain fine-tuning is the teacher itself (transformers, SDPA) trained
with next-token CE. Medians over timed steps after warm-up (the first steps compile FlexAttention and
the Triton kernels). Every KD step gets a fresh segment-id tensor, as from a data loader, so the per-batch
FlexAttention block-mask build is part of the KD time (runs before 2026-11-27's third session reused one).

``--profile`` adds, for plain fine-tuning and every cached-logits KD row, the breakdown of
``runs/benchmarks/profiling.py`` over two steps (GPU time per kernel family, GPU-busy fraction, costliest kernels,
the host side and the places that synchronise).

``--compile-blocks`` times the KD rows a second time after ``torch.compile`` of every student block (in place,
same student, same process). ``--pointwise`` runs the KD rows once per listed backend of the mixer's feature
maps, gates and output mix (``XDistillConfig.pointwise_backend``), in this process on the same student, so fused
and unfused compare side by side. ``--device cpu`` is a smoke run of the same code path (tiny sizes; no memory
column; the Triton backend there needs ``TRITON_INTERPRET=1`` in the environment).

    python runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --pointwise torch triton --out results.md
    python runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --profile --out results.md  # + where time goes
    python runs/benchmarks/bench_stage2.py --device cpu --seq-len 64 --batch 1 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from profiling import profile_step  # runs/benchmarks/profiling.py (this script's folder is on sys.path)

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
        PROFILES.append(profile_step(step, dev, "plain fine-tuning (teacher, SDPA)"))
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
    parser.add_argument("--compile-blocks", action="store_true",
                        help="time the KD rows again with the student's blocks compiled "
                             "(StudentOptions.compile_blocks)")
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
    # eager first, then (--compile-blocks) the same student with its blocks compiled in place
    for blocks in ("eager", "compiled") if args.compile_blocks else ("eager",):
        if blocks == "compiled":
            module.student.compile_blocks()
        for backend in args.pointwise:
            for mixer in mixers:
                mixer.pointwise_backend = backend
            for name, inputs in (("cached top-k logits", cached), ("live teacher", batch)):
                # a fresh segment-id tensor per step, as the data loader gives: the attention's block mask is
                # cached per tensor, so reusing one would leave its per-batch build out of the timing
                step = _train_step(
                    lambda inputs=inputs: module._losses({**inputs, "segment_ids": inputs["segment_ids"].clone()}
                                                         ).loss, params, dev)
                label = f"KD, {name}, pointwise {backend}" + (", compiled blocks" if blocks == "compiled" else "")
                rows.append((label, *_time_steps(step, args.warmup, args.steps, dev)))
                if args.profile and inputs is cached:
                    PROFILES.append(profile_step(step, dev, label))

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
