"""``NonFiniteGuard`` on a KD run whose loss or one gradient is poisoned at a chosen step."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from reliability_helpers import build_cli, kd_overlay

from lit_xdistill.callbacks import NonFiniteError, NonFiniteGuard

BAD_STEP = 2
PARAM = "student.backbone.model.layers.1.self_attn.xdistill_mixer.gates.weight"


class WeightWatch(L.Callback):
    """Copies the weights before and after every optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _copy(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self._copy(pl_module)


def poisoned_cli(teacher_dir, text_dir, logit_cache, root, action: str, poison: str):
    overlay = kd_overlay(
        teacher_dir,
        text_dir,
        root,
        max_steps=4,
        logit_cache=logit_cache,
        callbacks=[{"class_path": "lit_xdistill.callbacks.NonFiniteGuard", "init_args": {"action": action}}],
    )
    return build_cli(
        overlay,
        "--model.class_path",
        "fault_injection.PoisonedKD",
        "--model.init_args.poison_steps",
        f"[{BAD_STEP}]",
        "--model.init_args.poison",
        poison,
    )


def test_skip_drops_the_bad_step_and_counts_it(teacher_dir, text_dir, logit_cache, tmp_path):
    cli = poisoned_cli(teacher_dir, text_dir, logit_cache, tmp_path, "skip", "loss")
    watch = WeightWatch()
    cli.trainer.callbacks.append(watch)
    with pytest.warns(UserWarning, match=f"skipped step {BAD_STEP}"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    guard = next(c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard))
    assert guard.skipped_steps == 1 and cli.trainer.global_step == 4
    assert cli.trainer.callback_metrics["train/skipped_steps"] == 1
    for name, weight in watch.after[BAD_STEP].items():  # the bad step changed nothing
        assert torch.equal(weight, watch.before[BAD_STEP][name]), name
    assert any(not torch.equal(w, watch.before[1][n]) for n, w in watch.after[1].items())  # good steps train
    assert all(torch.isfinite(w).all() for w in watch.after[3].values())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(s.get("skipped_steps") == 1 for s in state["callbacks"].values())  # survives a resume


def test_stop_saves_and_names_step_and_parameter(teacher_dir, text_dir, logit_cache, tmp_path):
    cli = poisoned_cli(teacher_dir, text_dir, logit_cache, tmp_path, "stop", PARAM)
    with pytest.raises(NonFiniteError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(error.value)
    assert f"step {BAD_STEP} " in message and "loss is finite" in message
    assert f"first parameter with a non-finite gradient: {PARAM}" in message
    saved = tmp_path / "ckpt" / f"nonfinite-step={BAD_STEP + 1}.ckpt"
    assert str(saved) in message
    state = torch.load(saved, map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == BAD_STEP  # the last good step is kept


def test_stop_on_nan_loss_names_the_loss(teacher_dir, text_dir, logit_cache, tmp_path):
    cli = poisoned_cli(teacher_dir, text_dir, logit_cache, tmp_path, "stop", "loss")
    with pytest.raises(
        NonFiniteError,
        match=rf"step {BAD_STEP} .*loss is non-finite.*"
        r"first module with a non-finite output on this batch: none",
    ):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
