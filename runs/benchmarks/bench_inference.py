"""Inference: prefill and decode of the hybrid student beside its teacher, one process, one card.

Teacher: transformers with SDPA and its static cache. Student: ``XDistillForCausalLM`` with its
constant-size cache (chunkwise mLSTM prefill returning the state, step kernel for decoding, sliding
window + sinks buffers). Both get the same real-text prompts. Reports, per context length:
prefill tokens/s and time to first token (batch 1), decode tokens/s and peak memory at batches 1/8/32.
Medians over repeats after a warm-up. With ``--shape llama8b`` both models use random weights of
Llama-3.1-8B shapes (no hub needed).

    python runs/benchmarks/bench_inference.py --contexts 1024 4096 16384 32768 65536 --out inference.md
    python runs/benchmarks/bench_inference.py --device cpu --shape tiny --contexts 64 128   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_xdistill.models import HybridCache, student_from_teacher
from lit_xdistill.teachers import TeacherSpec

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=5e5),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (compilation, autotuning, allocator)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_memory(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def _models(args, device):
    import transformers as tf

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "smollm2":
        spec = TeacherSpec("smollm2-135m-instruct", dtype="bfloat16" if device.type == "cuda" else "float32")
        teacher = spec.load_model(device)
    else:
        cfg = tf.LlamaConfig(max_position_embeddings=max(args.contexts) + args.new_tokens + 8, **SHAPES[args.shape])
        with torch.device(device):
            teacher = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    student = student_from_teacher(teacher, window=args.window).to(device).eval()
    return teacher, student


def _teacher_decode(teacher, prompt, new_tokens):
    return teacher.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")


def _student_decode(student, prompt, new_tokens):
    cache = HybridCache(batch_size=prompt.shape[0])
    token = student(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    for _ in range(new_tokens - 1):
        token = student(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["smollm2", *SHAPES], default="smollm2")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--window", type=int, default=256, help="student window (paper's inference benchmark: 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    teacher, student = _models(args, device)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = ["| context | batch | teacher prefill tok/s | student prefill tok/s | teacher TTFT ms | student TTFT ms "
            "| teacher decode tok/s | student decode tok/s | teacher peak GiB | student peak GiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = args.new_tokens
    with torch.inference_mode():
        for ctx in args.contexts:
            for batch in args.batches:
                prompt = torch.randint(0, vocab, (batch, ctx), generator=gen).to(device)
                t_pre = _median_time(lambda p=prompt: teacher(p, logits_to_keep=1), device, args.repeats)
                s_pre = _median_time(lambda p=prompt: student(p, logits_to_keep=1), device, args.repeats)
                # decode time = generating N tokens minus generating 1 (the prefill and first token)
                t_dec = (_median_time(lambda p=prompt: _teacher_decode(teacher, p, n), device, args.repeats)
                         - _median_time(lambda p=prompt: _teacher_decode(teacher, p, 1), device, args.repeats))
                s_dec = (_median_time(lambda p=prompt: _student_decode(student, p, n), device, args.repeats)
                         - _median_time(lambda p=prompt: _student_decode(student, p, 1), device, args.repeats))
                t_mem = _peak_memory(lambda p=prompt: _teacher_decode(teacher, p, n), device)
                s_mem = _peak_memory(lambda p=prompt: _student_decode(student, p, n), device)
                new = batch * (n - 1)
                rows.append(
                    f"| {ctx} | {batch} | {batch * ctx / t_pre:,.0f} | {batch * ctx / s_pre:,.0f} | {t_pre * 1e3:.1f} "
                    f"| {s_pre * 1e3:.1f} | {new / t_dec:,.0f} | {new / s_dec:,.0f} "
                    f"| {t_mem:.2f} | {s_mem:.2f} |"
                )
                print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = "\n".join([f"Inference, {name}, shape {args.shape}, {args.new_tokens} new tokens, "
                        f"student window {args.window}, medians of {args.repeats}", "", *rows])
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
