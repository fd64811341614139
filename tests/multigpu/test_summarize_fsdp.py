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


def _write_run(tb: Path, name: str, rates: list[float], mem: float, batch_size: int | None = None) -> None:
    writer = SummaryWriter(tb / name / "version_0")
    for step, rate in enumerate(rates):
        writer.add_scalar("train/tokens_per_s", rate, step)
        writer.add_scalar("train/gpu_mem_gb", mem - step * 0.1, step)
    writer.close()
    if batch_size is not None:  # what LightningCLI saves beside the events
        (tb / name / "version_0" / "config.yaml").write_text(
            f"model:\n  class_path: x\ndata:\n  seq_len: 4096\n  batch_size: {batch_size}\n")


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
    assert "| kdmix8b_2 | 2 | ? | 3 | 4,000 | 2,000 (" in table  # no config.yaml: micro-batch unknown
    assert (tmp_path / "fsdp.png").stat().st_size > 10_000


def test_runs_of_several_roots_scale_against_their_own_micro_batch(summarize, tmp_path):
    # the same jobs at 1 and at 2 sequences per GPU, in two verify_fsdp.sh roots: each micro-batch is its own
    # scaling series, and the table says which is which
    steady = [1000, 1200, 800, 1100, 900]
    _write_run(tmp_path / "b1" / "tb", "align8b_1", [100.0] * summarize.WARMUP_STEPS + steady, 60.0, batch_size=1)
    _write_run(tmp_path / "b1" / "tb", "align8b_4", [100.0] * summarize.WARMUP_STEPS + [3 * r for r in steady],
               20.0, batch_size=1)
    _write_run(tmp_path / "b2" / "tb", "align8b_1", [100.0] * summarize.WARMUP_STEPS + [2 * r for r in steady],
               65.0, batch_size=2)
    _write_run(tmp_path / "b2" / "tb", "align8b_4", [100.0] * summarize.WARMUP_STEPS + [7.2 * r for r in steady],
               24.0, batch_size=2)

    summarize.main(tmp_path / "b1", [tmp_path / "b2"])

    rows = {(r["run"], r["seqs_per_gpu"]): r for r in summarize.json.loads(
        (tmp_path / "b1" / "summary.json").read_text())["throughput"]}
    assert set(rows) == {("align8b_1", 1), ("align8b_4", 1), ("align8b_1", 2), ("align8b_4", 2)}
    assert rows["align8b_4", 1]["efficiency"] == pytest.approx(0.75)
    assert rows["align8b_4", 2]["efficiency"] == pytest.approx(0.90)
    assert rows["align8b_4", 2]["efficiency_vs"] == 1 and rows["align8b_1", 2]["efficiency"] == pytest.approx(1.0)
    table = (tmp_path / "b1" / "summary.md").read_text()
    assert "| align8b_4 | 4 | 2 x 4096 |" in table and "| align8b_4 | 4 | 1 x 4096 |" in table
    assert (tmp_path / "b1" / "fsdp.png").stat().st_size > 10_000
