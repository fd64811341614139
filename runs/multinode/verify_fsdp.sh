#!/usr/bin/env bash
# Issue 7's GPU verification on ONE node with 4 GPUs, in phases that each fit the device tool's 10-minute
# command limit. From the repository root, with lit-xdistill on PATH:
#
#   bash runs/multinode/verify_fsdp.sh setup    # random-weight teachers (8B shape + small) and the token cache
#   bash runs/multinode/verify_fsdp.sh four     # 4-GPU jobs: resume test (part 1), stage I and II at 4 GPUs
#   bash runs/multinode/verify_fsdp.sh lanes    # 1- and 2-GPU jobs, three lanes side by side (GPUs 0-1, 2, 3)
#   bash runs/multinode/verify_fsdp.sh two      # the 8B jobs on 1 and 2 GPUs, one at a time (a 2-GPU machine, or
#                                               # with `four` the scaling rows without co-tenants)
#   bash runs/multinode/verify_fsdp.sh wintie   # WinTieCallback + end-of-fit export under FSDP, 2 GPUs
#   bash runs/multinode/verify_fsdp.sh stage3   # logit cache on 1 vs 2 GPUs (same bytes), learned merge under FSDP
#   bash runs/multinode/verify_fsdp.sh summary  # runs/multinode/summarize_fsdp.py -> $ROOT/summary.{md,json,png}
#   bash runs/multinode/verify_fsdp.sh collect  # logs, TensorBoard events, summary, benchmarks -> $DEVICE_OUT/fsdp.tgz
# PHASE_SECONDS=N: jobs get a deadline N seconds from the start, so no process outlives the device tool's
# command limit and holds GPUs into the next call: at the deadline every rank of a fit gets SIGUSR2 (it prints
# all its threads' Python stacks into the job's log: where a stuck run waits) and SIGKILL 20 s later; later
# jobs are skipped. JOB_SECONDS=N also caps each job (one stuck job then leaves time for the next).
#
# Jobs (all Llama-shaped random-weight teachers and their hybrid students, data: Python stdlib source text):
#   align8b_{1,2,4}  stage I, Llama-3.1-8B shape, 4096 tokens x BIG_BATCH (1) sequences per GPU, BIG_STEPS (12)
#                    steps -> scaling
#   kd8b_4           stage II, full fine-tuning, live sharded teacher, same sizes, 4 GPUs
#   kdmix8b_{1,2,4}  stage II with train_params=mixer, 1 GPU in `two` only (full fine-tuning of 8B needs ~65 GB/GPU
#                    of AdamW state alone on 2 GPUs: docs/multigpu.md; kdmix8b_1 itself runs out of memory in
#                    its second step on an 80 GB H100, tenth session)                          -> scaling
#   parity{1,2}      small model (8 x 1024 hidden), stage II, global batch 8 x 1024, 50 steps   -> same loss
#   resume4, resume2 the parity run: 20 steps on 4 GPUs, then resumed on 2 GPUs to step 40    -> 4 -> 2 resume
#   wintie2          small model, stage II on 2 GPUs with the WinTieCallback and the end-of-fit export
#                    (needs the olmo eval data: offline_bundle.sh unpack)
#   bench_*          runs/benchmarks/bench_inference.py on one card (issue 9), lane 3 of `lanes` with BENCH=1 only
#                    (its numbers are then taken beside the FSDP jobs: better run it alone)
# SKIP="resume4 resume2 ...": jobs to leave out (e.g. the checks a previous session already measured).
# Each job logs to $ROOT/logs/NAME.log and marks $ROOT/done/NAME on success; a phase skips finished jobs, so
# a phase cut by the time limit continues where it stopped when called again.
# DRYRUN=1: the same commands at toy sizes on CPU (DDP over gloo): checks the plumbing, not speed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO=$PWD
ROOT=${ROOT:-/root/fsdp}
DRYRUN=${DRYRUN:-0}
PY=${PY:-python3}
mkdir -p "$ROOT"/{logs,done,tb,ckpt}
END=$(($(date +%s) + ${PHASE_SECONDS:-36000}))
# seconds left before the phase deadline, or fail (and say so) when too few remain to start a job
time_left() {
  local left=$((END - $(date +%s)))
  [ $left -ge 60 ] || { echo "[$(date +%T)] $1: skipped, ${left}s left in this phase"; return 1; }
  local cap=${JOB_SECONDS:-$left}
  echo $((left < cap ? left : cap))
}

if [ "$DRYRUN" = 1 ]; then
  L8=$ROOT/llama8b-toy; SMALL=$ROOT/llama-small-toy
  BIG_SIZE=(--layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 49152)
  SMALL_SIZE=(--layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 49152)
  STRATEGY=(--trainer.accelerator cpu --trainer.strategy ddp --trainer.precision 32-true)
  BIG_SEQ=64; SMALL_SEQ=32; BIG_STEPS=3; export OMP_NUM_THREADS=1
else
  L8=$ROOT/llama8b; SMALL=$ROOT/llama-small
  BIG_SIZE=(); SMALL_SIZE=(--layers 8 --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 4 --vocab 49152)
  STRATEGY=(--config configs/fsdp.yaml)
  BIG_SEQ=4096; SMALL_SEQ=1024; BIG_STEPS=${BIG_STEPS:-12}
fi
TEXT=$ROOT/text
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# Lightning starts one process per GPU, each with one OpenMP thread per core by default: 4 ranks x 64 threads
# oversubscribe the host during the CPU-side model construction.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Options every job shares: its TensorBoard folder, the token cache, no validation, a step logged each step.
common() {
  echo --data.sources "[$TEXT]" --data.cache_dir "$ROOT/tokens" --trainer.limit_val_batches 0 \
       --trainer.num_sanity_val_steps 0 --trainer.log_every_n_steps 1 --trainer.enable_model_summary false \
       --trainer.logger.init_args.save_dir "$ROOT/tb"
}
# The 8B-shaped jobs: no checkpoints and no export (an 8B sharded checkpoint with AdamW state is ~130 GB).
big() {
  echo --config "configs/$1.yaml" --model.init_args.teacher.name "$L8" --data.tokenizer "$L8" \
       --data.seq_len $BIG_SEQ --data.batch_size ${BIG_BATCH:-1} --trainer.max_steps $BIG_STEPS --model.init_args.export_dir null \
       --trainer.callbacks "[]" --trainer.enable_checkpointing false $(common)
}
# The small-model KD run shared by the parity and resume jobs: warm-up 5 steps to lr 1e-4, then constant, so
# max_steps does not change the schedule and runs of 40 and 50 steps are comparable step by step.
small() {
  echo --config configs/kd.yaml --model.init_args.teacher.name "$SMALL" --data.tokenizer "$SMALL" \
       --data.seq_len $SMALL_SEQ --model.init_args.student.init_from null --model.init_args.lr 1e-4 \
       --model.init_args.warmup_steps 5 --model.init_args.export_dir null $(common)
}
# Checkpoints every 10 steps into one fixed folder (a logger version folder changes between runs).
CKPT_CB='[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: '"$ROOT"'/ckpt/resume, filename: "{step}", save_top_k: -1, every_n_train_steps: 10}}]'

# job NAME CMD...: run CMD (output to logs/NAME.log) unless NAME is done, in SKIP or out of time; at the deadline
# SIGUSR2 (lit-xdistill prints every thread's stack; the benchmark just ends), SIGKILL 20 s later. Marks
# done/NAME on success, shows the log's tail on failure.
job() {
  local name=$1; shift
  [ -f "$ROOT/done/$name" ] && { echo "[$(date +%T)] $name: done before, skipped"; return 0; }
  [[ " ${SKIP:-} " == *" $name "* ]] && { echo "[$(date +%T)] $name: in SKIP, skipped"; return 0; }
  local left; left=$(time_left "$name") || { echo "$left"; return 1; }
  echo "[$(date +%T)] $name: start on GPU(s) ${CUDA_VISIBLE_DEVICES:-all}"
  local started=$SECONDS
  # In a session of its own, so that ranks which outlive rank 0 can be ended: a rank blocked in a collective
  # never runs its Python SIGUSR2 handler, and timeout's SIGKILL goes out only while rank 0 still runs (on
  # the GPUs, rank 1 of a timed-out job held its card into the next job).
  setsid timeout -s USR2 -k 20 "$left" "$@" > "$ROOT/logs/$name.log" 2>&1 &
  local pid=$!
  wait $pid
  local rc=$?
  # Ranks still alive after rank 0 has ended: either slower to exit (CUDA teardown) or stuck in a collective.
  # They get 30 s to end by themselves; then SIGUSR2 (lit-xdistill prints their Python stacks into the log) and
  # SIGKILL. The log line says which of the two it was.
  left_over() { ps -o pid=,stat=,args= -s $pid | awk '$2 !~ /^Z/'; }  # zombies hold nothing
  if [ -n "$(left_over)" ]; then
    local waited=0
    while [ -n "$(left_over)" ] && [ $waited -lt 30 ]; do sleep 1; waited=$((waited + 1)); done
    if [ -z "$(left_over)" ]; then
      echo "[$(date +%T)] $name: the other ranks ended ${waited} s after rank 0"
    else
      echo "[$(date +%T)] $name: ranks still running 30 s after rank 0, stacks into its log, then killed:"
      left_over
      pkill -USR2 -s $pid; sleep 5; pkill -KILL -s $pid
    fi
  fi
  echo "[$(date +%T)] $name: rc=$rc after $((SECONDS - started)) s"
  [ $rc = 0 ] && touch "$ROOT/done/$name" || grep -v '^\s*$' "$ROOT/logs/$name.log" | tail -n 40
  return $rc
}

# GPU numbers in this script are positions among the cards it was given: with CUDA_VISIBLE_DEVICES=2,3 set on
# entry, `two` runs on the physical cards 2 and 3 (another job can hold 0 and 1). Unset: all cards, as numbered.
IFS=, read -ra GIVEN_GPUS <<<"${CUDA_VISIBLE_DEVICES:-}"
cards() {  # cards 0,1 -> the physical ids at those positions, comma-separated
  [ ${#GIVEN_GPUS[@]} = 0 ] && { echo "$1"; return; }
  local ids=() i
  for i in ${1//,/ }; do ids+=("${GIVEN_GPUS[$i]:?only ${#GIVEN_GPUS[@]} GPUs given}"); done
  (IFS=,; echo "${ids[*]}")
}

# fit NAME GPUS ARGS...: one `lit-xdistill fit` on the listed GPUs (comma-separated).
# The strategy options go after ARGS: configs/fsdp.yaml must follow the stage config it overrides.
fit() {
  local name=$1 gpus; gpus=$(cards "$2") || return 1; shift 2
  local n; n=$(awk -F, '{print NF}' <<<"$gpus")
  CUDA_VISIBLE_DEVICES=$gpus MASTER_PORT=$((29500 + 10 * ${gpus:0:1})) job "$name" \
    lit-xdistill fit "$@" "${STRATEGY[@]}" --trainer.devices "$n" --trainer.logger.init_args.name "$name"
}

# bench NAME GPU ARGS...: the inference benchmark on one card (not in a dry run).
bench() {
  local name=$1 gpu; gpu=$(cards "$2") || return 1; shift 2
  [ "$DRYRUN" = 1 ] && return 0
  CUDA_VISIBLE_DEVICES=$gpu job "$name" $PY runs/benchmarks/bench_inference.py "$@" --out "$ROOT/$name"
}

setup() {
  [ -d "$L8" ] || $PY runs/multinode/make_random_teacher.py "$L8" "${BIG_SIZE[@]}"
  [ -d "$SMALL" ] || $PY runs/multinode/make_random_teacher.py "$SMALL" "${SMALL_SIZE[@]}"
  if [ ! -d "$TEXT" ]; then  # ~1.5M tokens: the top-level modules of the running Python's stdlib
    mkdir -p "$TEXT.tmp"
    $PY - "$TEXT.tmp" <<'EOF'
import pathlib, shutil, sys, sysconfig
for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
    shutil.copy(path, pathlib.Path(sys.argv[1]) / (path.stem + ".txt"))
EOF
    mv "$TEXT.tmp" "$TEXT"
  fi
  # Tokenise once, here, rather than in concurrently starting jobs.
  $PY -c "from lit_xdistill.data import DistillDataModule as D; D(tokenizer='$SMALL', sources=['$TEXT'], cache_dir='$ROOT/tokens').prepare_data()"
}

four() {  # all four GPUs, one job after the other
  local G=0,1,2,3
  fit resume4 $G $(small) --data.batch_size 2 --trainer.max_steps 20 --trainer.callbacks "$CKPT_CB"
  fit align8b_4 $G $(big align)
  fit kdmix8b_4 $G $(big kd) --model.init_args.student.init_from null --model.init_args.train_params mixer
  fit kd8b_4 $G $(big kd) --model.init_args.student.init_from null
}

lanes() {  # three lanes side by side on disjoint GPUs
  (
    fit resume2 0,1 $(small) --data.batch_size 4 --trainer.max_steps 40 --trainer.callbacks "$CKPT_CB" \
        --ckpt_path "$ROOT/ckpt/resume/step=20.ckpt"
    fit parity2 0,1 $(small) --data.batch_size 4 --trainer.max_steps 50
    fit align8b_2 0,1 $(big align)
    fit kdmix8b_2 0,1 $(big kd) --model.init_args.student.init_from null --model.init_args.train_params mixer
  ) > "$ROOT/logs/lane01.txt" 2>&1 &
  (
    fit parity1 2 $(small) --data.batch_size 8 --trainer.max_steps 50
    fit align8b_1 2 $(big align)
  ) > "$ROOT/logs/lane2.txt" 2>&1 &
  [ "${BENCH:-0}" = 1 ] && (  # a speed claim beside other jobs on the host: off unless asked for
    bench bench_smollm2 3 --shape smollm2 --contexts 1024 4096 16384 32768 65536 --batches 1 8 32
    bench bench_llama8b_a 3 --shape llama8b --contexts 1024 4096 16384 --batches 1 8 32
    bench bench_llama8b_b 3 --shape llama8b --contexts 32768 65536 --batches 1 8 32
  ) > "$ROOT/logs/lane3.txt" 2>&1 &
  wait
  cat "$ROOT"/logs/lane*.txt
}

two() {  # the 8B jobs on 1 and 2 GPUs one after the other, each alone on the machine (with `four`: the scaling
          # rows without co-tenants; the ninth session's 1-GPU baseline ran beside other jobs)
  fit align8b_1 0 $(big align)
  fit kdmix8b_1 0 $(big kd) --model.init_args.student.init_from null --model.init_args.train_params mixer
  fit align8b_2 0,1 $(big align)
  fit kdmix8b_2 0,1 $(big kd) --model.init_args.student.init_from null --model.init_args.train_params mixer
}

wintie() {  # the callback and the export under FSDP on 2 GPUs (after `lanes`, GPUs free)
  local suite=$ROOT/suite.yaml
  printf 'name: fsdp\nlimit: 100\ntasks:\n  - {task: piqa, shots: 0, metric: acc_norm}\n' > "$suite"
  fit wintie2 0,1 $(small) --data.batch_size 4 --trainer.max_steps 10 \
    --model.init_args.export_dir "$ROOT/export/wintie2" \
    --trainer.callbacks "[{class_path: lit_xdistill.callbacks.WinTieCallback, init_args: {suite: $suite, every_n_epochs: 0, every_n_train_steps: 10, batch_size: 16, cache_dir: $ROOT/eval_cache}}, {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: $ROOT/ckpt/wintie2, filename: '{step}', every_n_train_steps: 10}}]"
}

stage3() {  # the logit cache written on 1 and on 2 GPUs (torchrun; must be the same bytes), then stage III's learned
            # merge of two experts under FSDP on 2 GPUs, reading that cache (after `setup`)
  local small_yaml=$ROOT/small.yaml experts=$ROOT/experts
  # the small teacher over the first ~200 blocks of the stdlib text (the cache and the merge read the same)
  printf 'model:\n  init_args:\n    teacher: {name: %s}\ndata:\n  tokenizer: %s\n  sources: [%s]\n  cache_dir: %s\n  seq_len: %s\n  max_train_tokens: %s\n' \
    "$SMALL" "$SMALL" "$TEXT" "$ROOT/tokens" "$SMALL_SEQ" $((200 * SMALL_SEQ)) > "$small_yaml"
  local cfg="[configs/kd.yaml, $small_yaml]" nproc=2 gpus
  gpus=$(cards 0,1) || return 1
  CUDA_VISIBLE_DEVICES=${gpus%%,*} job cache1 lit-xdistill cache_logits "$cfg" "$ROOT/cache1" --k 64
  CUDA_VISIBLE_DEVICES=$gpus job cache2 $PY -m torch.distributed.run --standalone --nproc-per-node $nproc -m lit_xdistill.cli \
    cache_logits "$cfg" "$ROOT/cache2" --k 64
  if [ -d "$ROOT/cache1/train" ] && [ -d "$ROOT/cache2/train" ]; then
    diff -r "$ROOT/cache1/train" "$ROOT/cache2/train" > /dev/null && echo "[$(date +%T)] cache1 = cache2: identical" \
      || echo "[$(date +%T)] cache1 and cache2 DIFFER"
  fi
  [ -d "$experts/e1" ] || $PY - "$SMALL" "$experts" <<'EOF2'
import sys, torch
from transformers import LlamaForCausalLM
from lit_xdistill.models import student_from_teacher
from lit_xdistill.teachers import TeacherSpec
spec = TeacherSpec(sys.argv[1])
for i in range(2):  # two experts: the converted student with its own noise on every weight
    student = student_from_teacher(LlamaForCausalLM.from_pretrained(sys.argv[1]), spec.identity)
    gen = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    student.config.lineage = {"seed": "sha256:verify-fsdp", "stage": "kd"}
    student.save_pretrained(f"{sys.argv[2]}/e{i}")
    spec.load_tokenizer().save_pretrained(f"{sys.argv[2]}/e{i}")
EOF2
  fit merge2 0,1 --config configs/merge.yaml --config "$small_yaml" --model.init_args.experts "[$experts/e0, $experts/e1]" \
    --data.batch_size 2 --data.logit_cache "$ROOT/cache2" --model.init_args.top_k 64 --trainer.max_steps 10 \
    --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0 --trainer.log_every_n_steps 1 \
    --model.init_args.export_dir "$ROOT/export/merge2" --trainer.logger.init_args.save_dir "$ROOT/tb"
  [ -f "$ROOT/export/merge2/merge_coefficients.json" ] && cat "$ROOT/export/merge2/merge_coefficients.json"
}

case "${1:-}" in
  setup) setup ;;
  stage3) stage3 ;;
  four) four ;;
  lanes) lanes ;;
  two) two ;;
  wintie) wintie ;;
  summary) $PY runs/multinode/summarize_fsdp.py "$ROOT" ;;
  collect) (cd "$ROOT" && tar czf "${DEVICE_OUT:-$OUT}/fsdp.tgz" --exclude='*.ckpt' --exclude=checkpoints \
             $(ls -d logs done tb summary.* fsdp.png bench_* 2>/dev/null)) ;;
  *) echo "usage: $0 setup|four|lanes|two|wintie|stage3|summary|collect" >&2; exit 2 ;;
esac
