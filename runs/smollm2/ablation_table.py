"""The ablation table and figure of runs/smollm2/ablations.sh, from whatever arms have finished.

    python runs/smollm2/ablation_table.py ABL_OUT [SUITE]   # -> ABL_OUT/ablations.md, ABL_OUT/ablations.png

Per arm: the last validation CE and KL of stage II (summary.json of 40_plots.sh) and α* over the suite
(eval/teacher.json, eval/student.json of 30_eval.sh). A missing piece (an arm cut by the device time) shows
as "not run" instead of failing the whole table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from lit_xdistill.eval.commands import compare_results
from lit_xdistill.eval.report import load_results

ARMS = [("mixer-hybrid", "mLSTM + SWA + sinks", "0.9 / 0.1"), ("mixer-swa-nosinks", "mLSTM + SWA", "0.9 / 0.1"),
        ("mixer-mlstm", "mLSTM only", "0.9 / 0.1"), ("mixer-linear", "linear attention", "0.9 / 0.1"),
        ("loss-0.5-0.5", "mLSTM + SWA + sinks", "0.5 / 0.5"), ("loss-0-1", "mLSTM + SWA + sinks", "0 / 1")]


def arm_row(arm: Path, suite: str | None) -> dict:
    """val/ce, val/kl and alpha_star of one arm; None where the arm did not get that far."""
    row = {"val/ce": None, "val/kl": None, "alpha_star": None, "c0": None}
    summary = arm / "summary.json"
    if summary.is_file():
        last = json.loads(summary.read_text()).get("kd", {}).get("last", {})
        row.update({key: last.get(key) for key in ("val/ce", "val/kl")})
    if (arm / "eval/student.json").is_file() and (arm / "eval/teacher.json").is_file():
        report = compare_results(load_results(arm / "eval/teacher.json"), load_results(arm / "eval/student.json"),
                                 suite=suite)
        row.update(alpha_star=report.alpha_star, c0=report.coverage_at(0.0))
    return row


def main(root: Path, suite: str | None) -> str:
    rows = [(name, mixer, weights, arm_row(root / name, suite)) for name, mixer, weights in ARMS]
    fmt = lambda value, spec: "not run" if value is None else format(value, spec)  # noqa: E731
    lines = ["| arm | mixer | CE / KL weights | val CE | val KL | C_0 | α* |", "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {mixer} | {weights} | {fmt(r['val/ce'], '.4f')} | {fmt(r['val/kl'], '.4f')} | "
              f"{fmt(r['c0'], '.3f')} | {fmt(r['alpha_star'], '.2f')} |" for name, mixer, weights, r in rows]
    table = "\n".join(lines) + "\n"
    (root / "ablations.md").write_text(table)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    labels = [f"{mixer}\n{weights}" for _, mixer, weights, _ in rows]
    for ax, key, title in zip(axes, ("val/ce", "val/kl", "alpha_star"),
                              ("stage II val CE", "stage II val KL(teacher || student)", "α* (lower is better)")):
        values = [r[key] for *_, r in rows]
        ax.bar(range(len(rows)), [v or 0 for v in values], color=["C0"] * 4 + ["C1"] * 2)
        for i, v in enumerate(values):
            ax.annotate("not run" if v is None else f"{v:.3g}", (i, v or 0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(title)
        if key == "val/kl":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(root / "ablations.png", dpi=120)
    plt.close(fig)
    return table


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
