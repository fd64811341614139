"""Stage II throughput: KD with cached logits and with a live teacher, beside plain fine-tuning.

One process, one card, the same batch (B x S tokens of real text), bf16 autocast over fp32 master
weights, AdamW. Each step = forward + backward + optimizer step of the real ``KDModule`` loss (its
training_step minus logging); plain fine-tuning is the teacher itself (transformers, SDPA) trained
with next-token CE. Medians over timed steps after warm-up (the first steps compile FlexAttention and
the Triton kernels).

    python runs/benchmarks/bench_stage2.py --seq-len 4096 --batch 4 --out results.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_xdistill.modules import KDModule, StudentOptions, topk_logprobs
from lit_xdistill.teachers import TeacherSpec


def _time_steps(step, n_warmup: int, n_timed: int) -> tuple[float, float]:
    for _ in range(n_warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n_timed):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def _train_step(model_step, params):
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model_step()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _plain_finetuning(spec: TeacherSpec, batch: dict, args) -> tuple[tuple, tuple]:
    """Time plain fine-tuning of the teacher (what KD is compared with); return its teacher top-k too."""
    plain = spec.load_model(batch["input_ids"].device).float().requires_grad_(True).train()
    step = _train_step(lambda: plain(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
                       list(plain.parameters()))
    row = ("plain fine-tuning (teacher, SDPA)", *_time_steps(step, args.warmup, args.steps))
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
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    dev = torch.device("cuda")
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
    torch.cuda.empty_cache()

    module = KDModule(teacher=spec, student=StudentOptions(window=512, n_sinks=4), top_k=args.top_k)
    module.configure_model()
    module.to(dev).train()
    params = [p for p in module.student.parameters() if p.requires_grad]
    cached = {**batch, "topk_ids": cached_ids.view(args.batch, args.seq_len, -1),
              "topk_logprobs": cached_lp.view(args.batch, args.seq_len, -1)}
    step = _train_step(lambda: module._losses(cached).loss, params)
    rows.append(("KD, cached top-k logits", *_time_steps(step, args.warmup, args.steps)))
    step = _train_step(lambda: module._losses(batch).loss, params)
    rows.append(("KD, live teacher", *_time_steps(step, args.warmup, args.steps)))

    tokens = args.batch * args.seq_len
    base = tokens / rows[0][1]
    lines = [
        f"Stage II throughput, {torch.cuda.get_device_name()}, teacher {args.teacher}, "
        f"B={args.batch} x S={args.seq_len}, bf16 autocast, median of {args.steps} steps",
        "",
        "| run | step (ms) | tokens/s | vs plain | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, sec, mem in rows:
        lines.append(f"| {name} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {tokens / sec / base:.2f}x | {mem:.1f} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
