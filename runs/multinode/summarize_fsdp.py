"""Tables and a figure from the TensorBoard logs of ``verify_fsdp.sh`` (issue 7).

    python runs/multinode/summarize_fsdp.py /root/fsdp      # -> summary.md, summary.json, fsdp.png there
    python runs/multinode/summarize_fsdp.py /root/fsdp /root/fsdp-b2   # + the 8B rows of another root (e.g. the
                                                                       # same jobs run with BIG_BATCH=2)

Throughput: ``train/tokens_per_s`` is the global rate of one step (all GPUs); the median over steps >= 3
(the first steps compile kernels and warm the allocator) divided by the GPU count gives tokens/s per GPU.
Scaling efficiency at N GPUs = per-GPU rate at N / per-GPU rate at the smallest count run with the same
sequences per GPU (weak scaling: the per-GPU batch is fixed; it is read from the config LightningCLI saved).
Memory: ``train/gpu_mem_gb`` is rank 0's ``torch.cuda.max_memory_allocated``.
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


def micro_batch(run_dir: Path) -> tuple[int | None, int | None]:
    """Sequences per GPU and their length, from the config LightningCLI saved with the newest version."""
    import yaml

    configs = sorted(run_dir.glob("version_*/config.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not configs:
        return None, None
    data = (yaml.safe_load(configs[-1].read_text()) or {}).get("data") or {}
    return data.get("batch_size"), data.get("seq_len")


def gpus_of(name: str) -> int:
    """The GPU count a run's name ends with (``align8b_4`` -> 4)."""
    return int(re.search(r"(\d+)$", name).group(1))


def throughput(runs: dict[str, dict], shapes: dict[str, tuple] | None = None) -> list[dict]:
    """One row per 8B-shaped run: median tokens/s (all GPUs and per GPU), peak memory, scaling efficiency.
    ``shapes``: run name -> (sequences per GPU, sequence length), where known (``micro_batch``)."""
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
        seqs, seq_len = (shapes or {}).get(name, (None, None))
        rows.append({"run": name, "gpus": n, "seqs_per_gpu": seqs, "seq_len": seq_len, "steady_steps": len(steady),
                     "tokens_per_s": statistics.median(steady), "tokens_per_s_per_gpu": statistics.median(steady) / n,
                     "tokens_per_s_per_gpu_iqr": [q1 / n, q3 / n], "peak_mem_gb": max(mem.values()) if mem else None})
    return scaling_efficiency(rows)


def series(row: dict) -> tuple[str, int | None]:
    """The scaling series a row belongs to: its stage (``align8b``) and sequences per GPU."""
    return row["run"].rsplit("_", 1)[0], row["seqs_per_gpu"]


def scaling_efficiency(rows: list[dict]) -> list[dict]:
    """Sets each row's efficiency against its series' smallest GPU count that ran."""
    for row in rows:
        base = min((r for r in rows if series(r) == series(row)), key=lambda r: r["gpus"])
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
    """Loss curves, their step-by-step relative differences to the 1-GPU run (the uninterrupted 2-GPU run when no
    1-GPU run exists), and (when the 8B runs exist) per-GPU throughput against the GPU count, one line per stage
    and micro-batch, labelled with the scaling efficiency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = {name: runs.get(name, {}).get("train/loss", {}) for name in ("parity1", "parity2", "resume4", "resume2")}
    resumed = {**loss["resume4"], **loss["resume2"]}
    reference, reference_label = (loss["parity1"], "1-GPU") if loss["parity1"] else (loss["parity2"], "2-GPU")
    fig, axes = plt.subplots(1, 3 if rows else 2, figsize=(17 if rows else 12, 4.2))
    ax_loss, ax_diff = axes[0], axes[1]
    for name, curve, style in (("1 GPU x 8", loss["parity1"], "-"), ("2 GPUs x 4", loss["parity2"], "--"),
                               ("4 GPUs x 2, resumed on 2 at step 20", resumed, ":")):
        if curve:
            steps = sorted(curve)
            ax_loss.plot(steps, [curve[s] for s in steps], style, label=name)
            if curve is not reference and reference:
                common = [s for s in steps if s in reference]
                ax_diff.semilogy(common, [abs(curve[s] / reference[s] - 1) + 1e-9 for s in common], style,
                                 label=name)
    ax_loss.set(xlabel="step", ylabel="train/loss (global batch of 8 x 1024)", title="small model, FSDP stage II")
    ax_diff.set(xlabel="step", ylabel=f"|loss / loss on {reference_label} run - 1|",
                title=f"relative difference to the {reference_label} run")
    for ax in (ax_loss, ax_diff):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if rows:
        ax_rate = axes[2]
        for key in sorted({series(r) for r in rows}, key=str):
            line = sorted((r for r in rows if series(r) == key), key=lambda r: r["gpus"])
            medians = [r["tokens_per_s_per_gpu"] for r in line]
            spread = [[m - r["tokens_per_s_per_gpu_iqr"][0] for m, r in zip(medians, line)],
                      [r["tokens_per_s_per_gpu_iqr"][1] - m for m, r in zip(medians, line)]]
            gpus = [r["gpus"] for r in line]
            ax_rate.errorbar(gpus, medians, yerr=spread, marker="o", capsize=4,
                             label=f"{key[0]}, {key[1] or '?'} x {line[0]['seq_len'] or '?'} per GPU")
            for r in line:
                ax_rate.annotate(f"{r['efficiency']:.0%}", (r["gpus"], r["tokens_per_s_per_gpu"]),
                                 textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax_rate.set(xscale="log", xlabel="GPUs", ylabel="tokens/s per GPU (median; bars: step quartiles)",
                    title="8B shape: weak scaling (label: efficiency)")
        counts = sorted({r["gpus"] for r in rows})
        ax_rate.set_xticks(counts, labels=[str(g) for g in counts])
        ax_rate.minorticks_off()  # a log axis would label 3 x 10^0 between 2 and 4
        ax_rate.set_ylim(bottom=0)
        ax_rate.legend(fontsize=8)
        ax_rate.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_runs(root: Path) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Scalars and micro-batch shapes of every run in one ``verify_fsdp.sh`` root."""
    dirs = [p for p in sorted((root / "tb").iterdir()) if p.is_dir()]
    return {p.name: read_scalars(p) for p in dirs}, {p.name: micro_batch(p) for p in dirs}


def main(root: Path, more_roots: list[Path] = ()) -> None:
    """Summarises ``root`` (all checks) into its summary.md/.json and fsdp.png; ``more_roots`` add their 8B rows."""
    runs, shapes = read_runs(root)
    rows = scaling_efficiency([row for r in ((runs, shapes), *map(read_runs, more_roots)) for row in throughput(*r)])
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
    lines = ["| run | GPUs | seqs x tokens per GPU | steps timed | tokens/s (all) | tokens/s per GPU (quartiles) | "
             "efficiency | peak mem GB (rank 0) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "n/a"
        q1, q3 = r["tokens_per_s_per_gpu_iqr"]
        shape = f"{r['seqs_per_gpu']} x {r['seq_len']}" if r["seqs_per_gpu"] else "?"
        lines.append(f"| {r['run']} | {r['gpus']} | {shape} | {r['steady_steps']} | {r['tokens_per_s']:,.0f} | "
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
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
