"""Tables and a figure from the TensorBoard logs of ``verify_fsdp.sh`` (issue 7).

    python runs/multinode/summarize_fsdp.py /root/fsdp      # -> summary.md, summary.json, fsdp.png there

Throughput: ``train/tokens_per_s`` is the global rate of one step (all GPUs); the median over steps >= 3
(the first steps compile kernels and warm the allocator) divided by the GPU count gives tokens/s per GPU.
Scaling efficiency at N GPUs = per-GPU rate at N / per-GPU rate at the smallest count run (weak scaling: the
per-GPU batch is fixed). Memory: ``train/gpu_mem_gb`` is rank 0's ``torch.cuda.max_memory_allocated``.
Loss parity and resume compare ``train/loss`` (the mean over ranks, i.e. over the global batch) step by step.
The export check compares the student exported at the end of ``wintie2`` with its last sharded checkpoint.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

WARMUP_STEPS = 3


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars of the newest version of one run: tag -> {step: value} (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted(run_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        return {}
    events = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def gpus_of(name: str) -> int:
    """The GPU count a run's name ends with (``align8b_4`` -> 4)."""
    return int(re.search(r"(\d+)$", name).group(1))


def throughput(runs: dict[str, dict]) -> list[dict]:
    """One row per 8B-shaped run: median tokens/s (all GPUs and per GPU), peak memory, scaling efficiency."""
    rows = []
    for name, scalars in sorted(runs.items()):
        rate = scalars.get("train/tokens_per_s", {})
        steady = [v for step, v in rate.items() if step >= WARMUP_STEPS] or list(rate.values())
        if not steady or not re.search(r"8b_\d$", name):
            continue
        n = gpus_of(name)
        mem = scalars.get("train/gpu_mem_gb", {})
        # the step-to-step spread says how far apart two medians must be to differ (shared hosts are noisy)
        q1, _, q3 = statistics.quantiles(steady, n=4) if len(steady) > 1 else (steady[0],) * 3
        rows.append({"run": name, "gpus": n, "steps": len(rate) + 1, "steady_steps": len(steady),
                     "tokens_per_s": statistics.median(steady), "tokens_per_s_per_gpu": statistics.median(steady) / n,
                     "tokens_per_s_per_gpu_iqr": [q1 / n, q3 / n], "peak_mem_gb": max(mem.values()) if mem else None})
    for row in rows:  # efficiency against the same stage at the smallest GPU count that ran
        family = row["run"].rsplit("_", 1)[0]
        base = min((r for r in rows if r["run"].rsplit("_", 1)[0] == family), key=lambda r: r["gpus"])
        row["efficiency_vs"] = base["gpus"]
        row["efficiency"] = row["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
    return rows


def compare(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Step-by-step relative difference of two loss curves over their common steps (None if none)."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return None
    rel = [abs(a[s] - b[s]) / abs(b[s]) for s in steps]
    worst = max(range(len(steps)), key=rel.__getitem__)
    return {"steps": [steps[0], steps[-1]], "max_rel_diff": rel[worst], "at_step": steps[worst],
            "last": [a[steps[-1]], b[steps[-1]]], "mean_rel_diff": statistics.fmean(rel)}


def export_check(root: Path) -> dict | None:
    """Max |difference| between the exported student and the consolidated last sharded checkpoint."""
    export = root / "export" / "wintie2"
    ckpts = sorted((root / "ckpt" / "wintie2").glob("step=*.ckpt"))
    if not (export / "config.json").is_file() or not ckpts:
        return None
    import torch
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint
    from safetensors.torch import load_file

    if ckpts[-1].is_dir():  # FSDP with state_dict_type sharded: a folder of torch.distributed.checkpoint shards
        state = _format_checkpoint(_load_distributed_checkpoint(ckpts[-1]))["state_dict"]
    else:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    exported = {}
    for file in export.glob("*.safetensors"):
        exported.update(load_file(file))
    worst, compared = 0.0, 0
    for key, value in exported.items():
        ckpt_value = state.get(f"student.{key}")
        if ckpt_value is None:
            continue
        worst = max(worst, (value.float() - ckpt_value.float()).abs().max().item())
        compared += 1
    return {"checkpoint": ckpts[-1].name, "tensors_compared": compared, "tensors_exported": len(exported),
            "max_abs_diff": worst, "dtype": str(next(iter(exported.values())).dtype)}


def plot(runs: dict[str, dict], rows: list[dict], path: Path) -> None:
    """Loss curves, their step-by-step relative differences to the 1-GPU run, and (when the 8B runs exist) the
    per-GPU throughput with its scaling efficiency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = {name: runs.get(name, {}).get("train/loss", {}) for name in ("parity1", "parity2", "resume4", "resume2")}
    resumed = {**loss["resume4"], **loss["resume2"]}
    fig, axes = plt.subplots(1, 3 if rows else 2, figsize=(17 if rows else 12, 4.2))
    ax_loss, ax_diff = axes[0], axes[1]
    for name, curve, style in (("1 GPU x 8", loss["parity1"], "-"), ("2 GPUs x 4", loss["parity2"], "--"),
                               ("4 GPUs x 2, resumed on 2 at step 20", resumed, ":")):
        if curve:
            steps = sorted(curve)
            ax_loss.plot(steps, [curve[s] for s in steps], style, label=name)
            if curve is not loss["parity1"] and loss["parity1"]:
                common = [s for s in steps if s in loss["parity1"]]
                ax_diff.semilogy(common, [abs(curve[s] / loss["parity1"][s] - 1) + 1e-9 for s in common], style,
                                 label=name)
    ax_loss.set(xlabel="step", ylabel="train/loss (global batch of 8 x 1024)", title="small model, FSDP stage II")
    ax_diff.set(xlabel="step", ylabel="|loss / loss on 1 GPU - 1|", title="relative difference to the 1-GPU run")
    for ax in (ax_loss, ax_diff):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if rows:
        ax_rate = axes[2]
        medians = [r["tokens_per_s_per_gpu"] for r in rows]
        spread = [[m - r["tokens_per_s_per_gpu_iqr"][0] for m, r in zip(medians, rows)],
                  [r["tokens_per_s_per_gpu_iqr"][1] - m for m, r in zip(medians, rows)]]
        ax_rate.bar([r["run"] for r in rows], medians, yerr=spread, capsize=4)
        for i, r in enumerate(rows):
            ax_rate.annotate(f"{r['efficiency']:.0%}", (i, r["tokens_per_s_per_gpu"]), ha="center", va="bottom")
        ax_rate.set(ylabel="tokens/s per GPU (median; bars: quartiles of the steps)",
                    title="8B shape, 4096 x 1 per GPU (label: efficiency)")
        ax_rate.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(root: Path) -> None:
    runs = {p.name: read_scalars(p) for p in sorted((root / "tb").iterdir()) if p.is_dir()}
    rows = throughput(runs)
    loss = {name: scalars.get("train/loss", {}) for name, scalars in runs.items()}
    resumed = {**loss.get("resume4", {}), **loss.get("resume2", {})}
    summary = {
        "throughput": rows,
        "parity_1_vs_2_gpus": compare(loss.get("parity2", {}), loss.get("parity1", {})),
        "resume_4_to_2_vs_uninterrupted_2": compare(
            {s: v for s, v in resumed.items() if s >= 20}, loss.get("parity2", {})),
        "resume_4_first_20_vs_2": compare(loss.get("resume4", {}), loss.get("parity2", {})),
        "export_vs_checkpoint": export_check(root),
        "wintie_callback": {tag: values[max(values)] for tag, values in runs.get("wintie2", {}).items()
                            if tag.startswith("wintie/")},
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| run | GPUs | steps timed | tokens/s (all) | tokens/s per GPU (quartiles) | efficiency | "
             "peak mem GB (rank 0) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        q1, q3 = r["tokens_per_s_per_gpu_iqr"]
        lines.append(f"| {r['run']} | {r['gpus']} | {r['steady_steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} ({q1:,.0f}-{q3:,.0f}) | "
                     f"{r['efficiency']:.1%} (vs {r['efficiency_vs']}) | {mem} |")
    for key in ("parity_1_vs_2_gpus", "resume_4_to_2_vs_uninterrupted_2", "resume_4_first_20_vs_2",
                "export_vs_checkpoint", "wintie_callback"):
        lines.append(f"\n{key}: {json.dumps(summary[key])}")
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows or loss:
        plot(runs, rows, root / "fsdp.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
