"""The FSDP summary's throughput rows (runs/multinode/summarize_fsdp.py) from real TensorBoard event files."""

import importlib.util
import statistics
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def summarize():
    spec = importlib.util.spec_from_file_location("summarize_fsdp", REPO / "runs/multinode/summarize_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(tb: Path, name: str, rates: list[float], mem: float) -> None:
    writer = SummaryWriter(tb / name / "version_0")
    for step, rate in enumerate(rates):
        writer.add_scalar("train/tokens_per_s", rate, step)
        writer.add_scalar("train/gpu_mem_gb", mem - step * 0.1, step)
    writer.close()


def test_rows_give_median_quartiles_and_efficiency_against_the_fewest_gpus(summarize, tmp_path):
    # warm-up steps (below WARMUP_STEPS) are slow and must not count; the 4-GPU run keeps 75 % per GPU
    one = [100.0] * summarize.WARMUP_STEPS + [1000, 1200, 800, 1100, 900]
    four = [100.0] * summarize.WARMUP_STEPS + [3000, 3200, 2800, 3100, 2900]
    _write_run(tmp_path / "tb", "align8b_1", one, mem=60.0)
    _write_run(tmp_path / "tb", "align8b_4", four, mem=20.0)
    _write_run(tmp_path / "tb", "parity1", [5.0, 4.0], mem=1.0)  # not an 8B-shaped run: no row
    runs = {p.name: summarize.read_scalars(p) for p in sorted((tmp_path / "tb").iterdir())}

    rows = {r["run"]: r for r in summarize.throughput(runs)}

    assert set(rows) == {"align8b_1", "align8b_4"}
    r1, r4 = rows["align8b_1"], rows["align8b_4"]
    assert r1["steady_steps"] == r4["steady_steps"] == 5
    assert r1["tokens_per_s_per_gpu"] == pytest.approx(1000.0)
    assert r4["tokens_per_s_per_gpu"] == pytest.approx(3000.0 / 4)
    assert r4["efficiency_vs"] == 1 and r4["efficiency"] == pytest.approx(0.75)
    q1, _, q3 = statistics.quantiles([3000, 3200, 2800, 3100, 2900], n=4)
    assert r4["tokens_per_s_per_gpu_iqr"] == pytest.approx([q1 / 4, q3 / 4])
    assert r1["peak_mem_gb"] == pytest.approx(60.0)


def test_main_writes_the_table_and_the_plot(summarize, tmp_path):
    _write_run(tmp_path / "tb", "kdmix8b_2", [50.0] * summarize.WARMUP_STEPS + [4000, 4200, 3800], mem=40.0)
    summarize.main(tmp_path)
    table = (tmp_path / "summary.md").read_text()
    assert "| kdmix8b_2 | 2 | 3 | 4,000 | 2,000 (" in table
    assert (tmp_path / "fsdp.png").stat().st_size > 10_000
