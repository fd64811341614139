"""Time an evaluation suite task by task for one model (issue 5: how long the default suite takes).

Each task runs alone through ``run_suite`` (the suite's shots and metric), timed from the first request to the
scores, the model load excluded and reported once. Every finished task is saved to ``--out`` at once and
``--resume`` skips the saved ones, so a long suite (MMLU's 14,042 full-set items) can go in pieces under a
time limit: repeat the command until it prints the table.

    python runs/benchmarks/time_suite.py --model smollm2-135m-instruct --limit 0 --out $OUT/suite_time.json
    python runs/benchmarks/time_suite.py --model smollm2-135m-instruct --limit 0 --tasks mmlu --resume --out T.json
    python runs/benchmarks/time_suite.py --student runs/kd/student --model smollm2-135m-instruct --limit 0 --out S.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from lit_xdistill.eval.commands import load_exported_student
from lit_xdistill.eval.harness import run_suite
from lit_xdistill.eval.report import task_score
from lit_xdistill.eval.tasks import EvalSuite, load_suite
from lit_xdistill.teachers import TeacherSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="teacher name, folder or hub id")
    parser.add_argument("--student", default=None, help="time this exported student instead of the teacher")
    parser.add_argument("--suite", default="default", help="suite name under configs/eval or a YAML path")
    parser.add_argument("--tasks", nargs="+", default=None, help="only these tasks of the suite")
    parser.add_argument("--limit", type=int, default=None, help="items per task; 0: full sets; default: the suite's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of per-task rows (rewritten per task)")
    parser.add_argument("--resume", action="store_true", help="keep the tasks already in --out, run the rest")
    args = parser.parse_args()

    suite = load_suite(args.suite)
    entries = [t for t in suite.tasks if args.tasks is None or t.task in args.tasks]
    unknown = set(args.tasks or ()) - {t.task for t in suite.tasks}
    if unknown:
        raise SystemExit(f"tasks {sorted(unknown)} are not in suite {suite.name!r}: {suite.task_names}")
    saved = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    rows = saved.get("rows", [])
    todo = [t for t in entries if t.task not in {r["task"] for r in rows}]

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    spec = TeacherSpec(args.model, dtype=dtype)
    started = time.perf_counter()
    if args.student:
        model, tokenizer = load_exported_student(args.student, spec)
        model = model.to(device=args.device, dtype=getattr(torch, dtype))
    else:
        model, tokenizer = spec.load_model(args.device), spec.load_tokenizer()
    meta = {"model": args.student or args.model, "suite": suite.name, "limit": args.limit,
            "batch_size": args.batch_size, "dtype": dtype, "load_seconds": round(time.perf_counter() - started, 1),
            "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    for entry in todo:
        started = time.perf_counter()
        results = run_suite(model, tokenizer, EvalSuite(entry.task, (entry,)), limit=args.limit,
                            batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        score = task_score(results, entry.task, entry.metric)
        items = sum(v.get("effective", v.get("original", 0)) for v in results.get("n-samples", {}).values())
        rows.append({"task": entry.task, "shots": entry.shots, "metric": score.metric, "score": score.value,
                     "items": items, "seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_suffix(".tmp")
        partial.write_text(json.dumps({"meta": saved.get("meta", meta), "rows": rows}, indent=1))
        partial.replace(args.out)

    lines = [f"{meta['model']} on suite {suite.name}, limit {args.limit}, batch {args.batch_size}, {dtype}, "
             f"{meta['device']} (model load {meta['load_seconds']} s, not included)", "",
             "| task | shots | metric | score | items | seconds |", "|---|---:|---|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['shots']} | {r['metric']} | {r['score']:.3f} | {r['items']:,} | {r['seconds']:.1f} |"
              for r in rows]
    lines.append(f"| **total** | | | | {sum(r['items'] for r in rows):,} | **{sum(r['seconds'] for r in rows):.1f}** |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
