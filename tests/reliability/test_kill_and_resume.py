"""Fault injection through the real CLI: SIGKILL, SIGTERM and SIGUSR1 mid-epoch, then ``--ckpt_path last``.

One uninterrupted run is the reference. The interrupted run is killed twice (SIGKILL, then SIGTERM)
and resumed after each; the token blocks it trained on (recorded by ``BatchRecorder``) and its
loss curve (read from TensorBoard) must equal the reference's: no block repeated or skipped, same steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from fault_injection import read_records
from lightning.pytorch.utilities.exceptions import SIGTERMException
from reliability_helpers import build_cli, kd_args, kd_overlay, launch_fit

MAX_STEPS = 10


def recorder(root: Path, sleep: float) -> list[dict]:
    return [
        {"class_path": "lit_xdistill.callbacks.NonFiniteGuard", "init_args": {"action": "stop"}},
        {"class_path": "lit_xdistill.callbacks.PreemptionCheckpoint", "init_args": {"signals": ["SIGUSR1"]}},
        {
            "class_path": "fault_injection.BatchRecorder",
            "init_args": {"path": str(root / "records.txt"), "sleep": sleep},
        },
    ]


def tensorboard_losses(runs: Path) -> dict[int, float]:
    """``train/loss`` per step over all TensorBoard versions under ``runs`` (later versions win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for version in sorted((runs / "kd").glob("version_*"), key=lambda p: int(p.name.split("_")[1])):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            losses.update({event.step: event.value for event in events.Scalars("train/loss")})
    return losses


def run_until(args: list[str], root: Path, sig: signal.Signals | None, after_records: int) -> int:
    """Run the CLI; once ``records.txt`` holds ``after_records`` lines send ``sig``. Returns the exit code."""
    process = launch_fit(args, root)
    deadline = time.monotonic() + 240
    while sig is not None and process.poll() is None and time.monotonic() < deadline:
        if len(read_records(root / "records.txt")) >= after_records:
            process.send_signal(sig)
            break
        time.sleep(0.05)
    return finish(process)


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def last_step(root: Path) -> int:
    return torch.load(root / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


def test_kill_and_term_then_resume_loses_nothing(teacher_dir, text_dir, logit_cache, tmp_path):
    ref_root, root = tmp_path / "reference", tmp_path / "interrupted"
    ref_overlay = kd_overlay(
        teacher_dir, text_dir, ref_root, MAX_STEPS, callbacks=recorder(ref_root, 0.0), logit_cache=logit_cache
    )
    reference = launch_fit(kd_args(ref_overlay), ref_root)  # runs beside the interrupted one
    overlay = kd_overlay(
        teacher_dir, text_dir, root, MAX_STEPS, callbacks=recorder(root, 0.25), logit_cache=logit_cache
    )
    kept: list[tuple[int, str]] = []
    resume: list[str] = []
    for sig, after in ((signal.SIGKILL, 3), (signal.SIGTERM, 3)):
        (root / "records.txt").unlink(missing_ok=True)
        code = run_until(kd_args(overlay, *resume), root, sig, after)
        log = (root / "log.txt").read_text()[-3000:]
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), log
        records, step = read_records(root / "records.txt"), last_step(root)
        assert records[0][0] == (kept[-1][0] + 1 if kept else 0), "did not continue at the checkpointed step"
        if sig != signal.SIGKILL:  # clean exit: the checkpoint holds every step that was started
            assert step == records[-1][0] + 1, log
        kept += [record for record in records if record[0] < step]  # steps after the checkpoint are redone
        resume = ["--ckpt_path", "last"]
    (root / "records.txt").unlink()
    code = run_until(kd_args(overlay, *resume), root, None, 0)
    assert code == 0, (root / "log.txt").read_text()[-3000:]
    kept += read_records(root / "records.txt")

    assert finish(reference) == 0, (ref_root / "log.txt").read_text()[-3000:]
    ref_records, ref_losses = read_records(ref_root / "records.txt"), tensorboard_losses(ref_root / "runs")
    assert [step for step, _ in ref_records] == list(range(MAX_STEPS))
    assert len({digest for _, digest in ref_records}) == MAX_STEPS  # all blocks distinct: a repeat would show
    assert kept == ref_records
    losses = tensorboard_losses(root / "runs")
    assert sorted(losses) == sorted(ref_losses)
    assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)


class SendSignal(L.Callback):
    """Sends ``signum`` to this process during step ``step``."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_checkpoints_the_current_step_and_exits_cleanly(teacher_dir, text_dir, logit_cache, tmp_path):
    overlay = kd_overlay(
        teacher_dir,
        text_dir,
        tmp_path,
        max_steps=8,
        every_n_steps=1000,
        logit_cache=logit_cache,
        callbacks=[{"class_path": "lit_xdistill.callbacks.PreemptionCheckpoint"}],
    )
    cli = build_cli(overlay)
    cli.trainer.callbacks.append(SendSignal(signal.SIGUSR1, step=2))
    with pytest.raises(SIGTERMException) as exit_:  # a SystemExit: the CLI exits with status 0
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert exit_.value.code is None
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers restored
    assert last_step(tmp_path) == 3  # the step that was running when the signal came is in the checkpoint
    resumed = build_cli(overlay)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert resumed.trainer.global_step == 8


def test_sigusr2_prints_every_stack_and_the_run_goes_on(teacher_dir, text_dir, tmp_path):
    """A seemingly stuck run answers SIGUSR2 with all its threads' Python stacks and keeps training."""
    root = tmp_path / "dump"
    overlay = kd_overlay(teacher_dir, text_dir, root, max_steps=6, callbacks=[
        {"class_path": "fault_injection.BatchRecorder",
         "init_args": {"path": str(root / "records.txt"), "sleep": 0.3}}])
    assert run_until(kd_args(overlay), root, signal.SIGUSR2, after_records=2) == 0
    log = (root / "log.txt").read_text()
    dump = log[log.index("most recent call first"):]  # faulthandler's header, then one frame per line
    assert "lightning/pytorch/loops" in dump, "the dump must show where the training loop was"
    assert len(read_records(root / "records.txt")) == 6, "the run must go on after the dump"


def test_live_teacher_is_kept_out_of_checkpoints(teacher_dir):
    """A registered live teacher would put its weights in every checkpoint and break --ckpt_path."""
    from lit_xdistill.modules import KDModule, StudentOptions
    from lit_xdistill.teachers import TeacherSpec

    module = KDModule(
        teacher=TeacherSpec(str(teacher_dir), dtype="float32"), student=StudentOptions(window=16)
    )
    module.live_teacher()
    assert not [key for key in module.state_dict() if key.startswith("_live_teacher")]
