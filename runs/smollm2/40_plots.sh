#!/usr/bin/env bash
# TensorBoard scalars -> PNGs (matplotlib, read straight from the event files) and summary.json with the
# numbers docs/results.md asks for: steps, tokens, training wall time and tokens/s per stage, last val values.
# Resumed pieces append to the same log folder and may redo steps after the last checkpoint: the value
# written last for a step wins; wall time sums each event file's first-to-last span (start-up excluded).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = Path(sys.argv[1])
plots, summary, stage_scalars = out / "plots", {}, {}
plots.mkdir(exist_ok=True)
for stage_dir in sorted(p for p in (out / "tb").glob("*/recipe") if p.is_dir()):
    stage = stage_dir.parent.name
    scalars, seconds = {}, 0.0
    for events_file in sorted(stage_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
        acc.Reload()
        times = []
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events})
            times += [e.wall_time for e in events]
        seconds += max(times) - min(times) if times else 0.0
    if not scalars:
        continue
    config = yaml.safe_load((stage_dir / "config.yaml").read_text())
    data = config["data"]
    steps = config["trainer"]["max_steps"]
    groups = {}
    for tag in scalars:  # per-layer alignment losses share one figure
        groups.setdefault(tag.rsplit("/", 1)[0] if tag.startswith("align/mse/") else tag, []).append(tag)
    for name, tags in groups.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for tag in sorted(tags):
            xs = sorted(scalars[tag])
            ax.plot(xs, [scalars[tag][x] for x in xs], label=tag.rsplit("/", 1)[-1] if len(tags) > 1 else None)
        ax.set(title=f"{stage}: {name}", xlabel="step", ylabel=name)
        if name.endswith("loss") or "mse" in name or name.endswith(("ce", "kl", "ppl")):
            ax.set_yscale("log")
        if len(tags) > 1:
            ax.legend(fontsize=5, ncol=3)
        fig.tight_layout()
        fig.savefig(plots / f"{stage}_{name.replace('/', '_')}.png", dpi=120)
        plt.close(fig)
    stage_scalars[stage] = scalars
    rate = list(scalars.get("train/tokens_per_s", {}).values())
    summary[stage] = {
        "max_steps": steps,
        "tokens": steps * data["batch_size"] * data["seq_len"],
        "train_wall_seconds": round(seconds, 1),
        "median_tokens_per_s": round(statistics.median(rate)) if rate else None,
        "last": {tag: values[max(values)] for tag, values in scalars.items() if tag.startswith("val/")},
    }
# one overview figure of the run: each stage's objective, train (every logged step) and validation
panels = [(stage, train, val, title) for stage, train, val, title in (
    ("align", "train/loss", "val/loss", "stage I: summed alignment MSE"),
    ("kd", "train/kl", "val/kl", "stage II: KL(teacher || student)"),
    ("kd", "train/ce", "val/ce", "stage II: CE")) if train in stage_scalars.get(stage, {})]
if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (stage, train, val, title) in zip(axes[0], panels):
        for tag, style in ((train, dict(lw=0.8, alpha=0.6)), (val, dict(marker="o", lw=1.5))):
            values = stage_scalars[stage].get(tag, {})
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], label=tag.split("/")[0], **style)
        ax.set(title=title, xlabel="step", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "curves.png", dpi=120)
    plt.close(fig)
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
PY
