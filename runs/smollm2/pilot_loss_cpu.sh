#!/usr/bin/env bash
# CPU pilot of the stage-II loss weighting (issue 10): does the 0.9 CE term pull the student away from the
# teacher? Two KD runs from the same stage-I student, 0.9 CE + 0.1 KL vs KL only, make-demo sizes (4 x 256
# tokens, window 64, live teacher, lr 1e-5 after 20 warm-up steps, 120 steps, validation every 20 steps on
# 8 blocks), then the teacher's own CE on the same validation blocks and a plot. ~55 min on 2 CPU cores.
#   STAGE1=runs/stage3-cpu/align/student bash runs/smollm2/pilot_loss_cpu.sh   # a stage-I export to start from
#   bash runs/smollm2/pilot_loss_cpu.sh                                        # else make-demo's stage I first
# Writes $OUT (default runs/pilot-loss-cpu): tb/, summary.json, pilot_loss_weighting_cpu.png.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=${PY:-python}
OUT=${OUT:-runs/pilot-loss-cpu}
DATA=(--config configs/demo/cpu.yaml --data.sources "[builtin:shakespeare, builtin:python-stdlib]")
mkdir -p "$OUT"
if [ -z "${STAGE1:-}" ]; then
  STAGE1=$OUT/align/student
  [ -f "$STAGE1/config.json" ] || $PY -m lit_xdistill.cli fit --config configs/align.yaml "${DATA[@]}" \
    --trainer.max_steps 80 --trainer.logger.init_args.save_dir "$OUT/tb" --model.init_args.export_dir "$STAGE1"
fi
for arm in 0.9-0.1 0-1; do
  [ -d "$OUT/tb/loss-$arm" ] && continue
  $PY -m lit_xdistill.cli fit --config configs/kd.yaml "${DATA[@]}" --config "configs/smollm2/ablations/loss-$arm.yaml" \
    --model.init_args.student.init_from "$STAGE1" --model.init_args.export_dir null \
    --model.init_args.warmup_steps 20 --trainer.max_steps 120 --trainer.val_check_interval 20 \
    --trainer.callbacks "[]" --trainer.enable_checkpointing false --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$OUT/tb" --trainer.logger.init_args.name "loss-$arm"
done
$PY - "$OUT" "$STAGE1" "${DATA[@]}" <<'EOF'
import json, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_xdistill.cli import XDistillCLI

out, stage1, data_args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
curves = {}
for arm in ("0.9-0.1", "0-1"):
    version = sorted((out / "tb" / f"loss-{arm}").glob("version_*"))[-1]
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    curves[arm] = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("val/kl", "val/ce")}

# the teacher's CE on the same validation blocks (what "fitting the data better than the teacher" means)
cli = XDistillCLI(args=["--config", "configs/kd.yaml", *data_args, "--model.init_args.student.init_from", stage1,
                        "--trainer.logger", "false"], run=False)
cli.datamodule.prepare_data()
cli.datamodule.setup("fit")
cli.model.configure_model()
teacher, total, tokens = cli.model.live_teacher(), 0.0, 0
with torch.no_grad():
    for batch in cli.datamodule.val_dataloader():
        logits = teacher(**cli.model.student_inputs(batch)).logits
        labels = batch["labels"].flatten()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100,
                                                   reduction="sum").item()
        tokens += int((labels != -100).sum())
teacher_ce = total / tokens
(out / "summary.json").write_text(json.dumps({"teacher_val_ce": teacher_ce, "val_tokens": tokens, **curves},
                                             indent=1))
fig, (ax_kl, ax_ce) = plt.subplots(1, 2, figsize=(11, 4))
for arm, label in (("0.9-0.1", "0.9 CE + 0.1 KL"), ("0-1", "KL only")):
    for ax, tag in ((ax_kl, "val/kl"), (ax_ce, "val/ce")):
        steps = sorted(curves[arm][tag])
        ax.plot(steps, [curves[arm][tag][s] for s in steps], marker="o", label=label)
ax_ce.axhline(teacher_ce, color="k", ls="--", label="teacher")
ax_kl.set(xlabel="step", ylabel="val KL(teacher || student), top-256", title="distance to the teacher")
ax_ce.set(xlabel="step", ylabel="val CE (nats/token)", title="fit to the data")
for ax in (ax_kl, ax_ce):
    ax.legend()
    ax.grid(alpha=0.3)
fig.suptitle(f"CPU pilot, SmolLM2-135M teacher, 120 KD steps of 4 x 256 tokens ({tokens} val tokens)")
fig.tight_layout()
fig.savefig(out / "pilot_loss_weighting_cpu.png", dpi=110)
print(json.dumps({"teacher_val_ce": teacher_ce, **{a: {t: c[t][max(c[t])] for t in c} for a, c in curves.items()}}))
EOF
