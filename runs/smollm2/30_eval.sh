#!/usr/bin/env bash
# Evaluation of the stage-II student against its teacher:
#  1. `lit-xdistill evaluate` on the default suite, full sets, one task per call: a task is the unit that
#     resumes (teacher scores are cached on disk after their first run), so a piece never exceeds
#     CHUNK_SECONDS by more than one task's student half; then the per-task results are merged and
#     `lit-xdistill wintie` writes the report over all tasks (eval/report.md, eval/wintie.png, α*).
#  2. Held-out perplexity of teacher and student per training domain (each corpus' heldout split, never
#     trained on) and on one domain not trained on. No CLI command computes it (KDModule has no test_step),
#     so the Python below does: exp(mean next-token CE) over the packed blocks, documents kept apart.
# Parts, for a machine with several GPUs (runs/smollm2/two_gpus.sh): EVAL_SIDE=teacher computes only the
# teacher's per-task scores (into the on-disk cache that `evaluate` reads; the teacher does not depend on
# training, so this can run beside it); EVAL_TASKS="a b" evaluates only those tasks and stops there: the
# merge, report and perplexity are left to a run without EVAL_TASKS.
# Exit 0: everything written (or this part done); exit 75: run again.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SUITE=${EVAL_SUITE:-$REPO/configs/eval/default.yaml}
EVAL_LIMIT=${EVAL_LIMIT:-0}       # 0 = full sets (issue 10); 200 = the ~1 min suite of docs/evaluation.md
EVAL_BATCH=${EVAL_BATCH:-32}
EVAL_SIDE=${EVAL_SIDE:-both}      # both | teacher
PPL_BLOCKS=${PPL_BLOCKS:-32}      # at most 32 x seq_len tokens per domain and model
# a domain none of the four corpora covers: legal prose (the licence texts every Debian system ships)
UNTRAINED=${UNTRAINED:-/usr/share/common-licenses}
TEACHER_NAME=${TEACHER:-smollm2-135m-instruct}
STUDENT=$OUT/kd/student
EVAL=$OUT/eval
[[ $EVAL_SIDE == teacher || -f $STUDENT/config.json ]] || {
  echo "no stage-II student in $STUDENT: run 20_kd.sh" >&2; exit 1; }
mkdir -p "$EVAL/tasks"
start=$SECONDS
left() { echo $((CHUNK_SECONDS - (SECONDS - start))); }

# --- 1. suite, task by task --------------------------------------------------------------------------------
tasks=$(suite_tasks "$SUITE")
for task in ${EVAL_TASKS:-$tasks}; do
  dir=$EVAL/tasks/$task
  [[ -f $dir/student.json ]] && continue
  (( $(left) > 30 )) || exit $AGAIN
  mkdir -p "$dir"
  "$PY" - "$SUITE" "$task" "$dir/suite.yaml" <<'PY'
import sys, yaml
suite = yaml.safe_load(open(sys.argv[1]))
entry = [t for t in suite["tasks"] if t["task"] == sys.argv[2]]
if not entry:
    raise SystemExit(f"EVAL_TASKS: {sys.argv[2]} is not a task of {sys.argv[1]}")
yaml.safe_dump({"name": f"{suite['name']}-{sys.argv[2]}", "limit": suite.get("limit"), "tasks": entry},
               open(sys.argv[3], "w"))
PY
  rc=0
  if [[ $EVAL_SIDE == teacher ]]; then  # the same cache entry `evaluate` looks up for this task's suite
    timeout --signal=TERM --kill-after=30 "$(left)" "$PY" -c 'import sys
from lit_xdistill.eval.harness import teacher_results
teacher_results(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "cuda" if __import__("torch").cuda.is_available() else "cpu")
print(f"[smollm2] teacher scores of {sys.argv[2]} cached")' "$TEACHER_NAME" "$dir/suite.yaml" "$EVAL_LIMIT" "$EVAL_BATCH" || rc=$?
  else
    timeout --signal=TERM --kill-after=30 "$(left)" "$XD" evaluate "$STUDENT" "$TEACHER_NAME" \
      --suite "$dir/suite.yaml" --out_dir "$dir" --limit "$EVAL_LIMIT" --batch_size "$EVAL_BATCH" || rc=$?
  fi
  if [[ $rc == 124 || $rc == 137 ]]; then
    echo "[smollm2] eval $task: piece ended at the time limit (teacher scores are kept); run again"
    exit $AGAIN
  fi
  (( rc == 0 )) || exit "$rc"
done
[[ $EVAL_SIDE == teacher ]] && { echo "[smollm2] teacher scores cached: ${EVAL_TASKS:-$tasks}"; exit 0; }
missing=$(for task in $tasks; do [[ -f $EVAL/tasks/$task/student.json ]] || echo -n "$task "; done)
# a part never merges, even when it finished the last task: parts run concurrently, and two of them ending
# together would both merge into the same files
[[ -z ${EVAL_TASKS:-} ]] || { echo "[smollm2] eval part done (${EVAL_TASKS}); still missing: ${missing:-none}"; exit 0; }
[[ -z $missing ]] || { echo "[smollm2] tasks still missing: $missing" >&2; exit 1; }
# merge the per-task lm-eval results into one file per model, then one Win-and-Tie report over the suite
"$PY" - "$EVAL" $tasks <<'PY'
import json, sys
from pathlib import Path

root, tasks = Path(sys.argv[1]), sys.argv[2:]
for side in ("teacher", "student"):
    merged = {}
    for task in tasks:
        for key, value in json.loads((root / "tasks" / task / f"{side}.json").read_text()).items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged.setdefault(key, value)
    (root / f"{side}.json").write_text(json.dumps(merged, indent=1))
PY
"$XD" wintie "$EVAL/teacher.json" "$EVAL/student.json" --suite "$SUITE" --plot "$EVAL/wintie.png" \
  --report "$EVAL/report.md"

# --- 2. held-out perplexity --------------------------------------------------------------------------------
[[ -f $EVAL/heldout_ppl.json ]] && { echo "[smollm2] evaluation complete in $EVAL"; exit 0; }
(( $(left) > 30 )) || exit $AGAIN
configs kd
rc=0
(cd "$OUT" && timeout --signal=TERM --kill-after=30 "$(left)" "$PY" - "$EVAL" "$STUDENT" "$TEACHER_NAME" \
   "$UNTRAINED" "$PPL_BLOCKS" "${CONFIGS[@]}" <<'PY'
import json, math, sys
from pathlib import Path

import torch
import yaml

from lit_xdistill.data import DistillDataModule
from lit_xdistill.models import XDistillForCausalLM, student_from_teacher
from lit_xdistill.teachers import TeacherSpec

out, student_dir, teacher_name, untrained, max_blocks = sys.argv[1:6]
data = {}
for path in sys.argv[6:]:  # the stage-II composition: same tokenizer, seq_len and sources as training
    data.update(yaml.safe_load(open(path)).get("data") or {})
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
spec = TeacherSpec(teacher_name, dtype="bfloat16" if device == "cuda" else "float32")
models = {
    "teacher": student_from_teacher(spec.load_model(), spec.identity, mixer="attention"),
    "student": XDistillForCausalLM.from_pretrained(student_dir),
}
models = {name: m.to(device=device, dtype=dtype).eval() for name, m in models.items()}

# the untrained domain: one JSONL document per licence file (the corpora readers take .txt/.jsonl)
docs = Path(out) / "untrained.jsonl"
files = sorted(p for p in Path(untrained).rglob("*") if p.is_file() and not p.is_symlink())
docs.write_text("".join(json.dumps({"text": p.read_text(errors="replace")}) + "\n" for p in files))
domains = [(source, "heldout") for source in data["sources"]]
domains.append((str(docs), "all"))  # nothing of it was trained on, so every split counts

def blocks(source, split):
    dm = DistillDataModule(tokenizer=data["tokenizer"], sources=[source], seq_len=data["seq_len"],
                           batch_size=1, cache_dir=data.get("cache_dir", "token-cache"))
    dm.prepare_data()
    for name in (["train", "val", "heldout"] if split == "all" else [split]):
        dataset = dm.dataset(name)
        yield from (dataset[i] for i in range(len(dataset)))

rows = []
with torch.no_grad():
    for source, split in domains:
        nll, count = {n: 0.0 for n in models}, 0
        for i, block in enumerate(blocks(source, split)):
            if i == int(max_blocks):
                break
            batch = {k: torch.as_tensor(v)[None].to(device) for k, v in block.items()
                     if k in ("input_ids", "segment_ids", "position_ids", "labels")}
            labels = batch.pop("labels")
            count += int((labels != -100).sum())
            for name, model in models.items():
                logits = model(**batch).logits.float()
                nll[name] += float(torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
        if count == 0:
            raise SystemExit(f"{source}: no {split} block of seq_len={data['seq_len']}")
        ppl = {name: math.exp(nll[name] / count) for name in models}
        rows.append({"domain": source, "split": split, "tokens": count, **ppl,
                     "ratio": ppl["student"] / ppl["teacher"]})
        print(rows[-1], flush=True)
(Path(out) / "heldout_ppl.json").write_text(json.dumps(rows, indent=1))
lines = ["| domain | split | tokens | teacher ppl | student ppl | student / teacher |", "|---|---|---:|---:|---:|---:|"]
lines += [f"| {r['domain']} | {r['split']} | {r['tokens']:,} | {r['teacher']:.3f} | {r['student']:.3f} | "
          f"{r['ratio']:.3f} |" for r in rows]
(Path(out) / "heldout_ppl.md").write_text("\n".join(lines) + "\n")
PY
) || rc=$?
[[ $rc == 124 || $rc == 137 ]] && exit $AGAIN
(( rc == 0 )) || exit "$rc"
echo "[smollm2] evaluation complete in $EVAL"
