"""WinTieCallback in a real 2-epoch Lightning fit on CPU, read back from TensorBoard's event file."""

from __future__ import annotations

import math

import lightning as L
import torch
from eval_helpers import TinyTeacherSpec, make_tiny_llama
from torch.utils.data import DataLoader

from lit_xdistill.callbacks import WinTieCallback


class TinyStudentModule(L.LightningModule):
    """Has what the callback reads: ``student``, ``tokenizer``, ``teacher_spec``."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.teacher_spec = tokenizer, TinyTeacherSpec(tokenizer)
        self.student = make_tiny_llama(len(tokenizer), seed=3)
        self.modes: list[bool] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.modes.append(self.student.training)
        return self.student(batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.student.parameters(), lr=1e-2)


def test_two_epoch_fit_logs_wintie_scalars_and_curve(tmp_path, tiny_tokenizer, eval_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: cb\nlimit: 2\ntasks:\n  - {task: piqa, metric: acc}\n  - {task: boolq, metric: acc}\n"
    )
    module = TinyStudentModule(tiny_tokenizer)
    module.student.train()
    data = DataLoader(torch.randint(0, len(tiny_tokenizer), (4, 12)), batch_size=2)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb")
    callback = WinTieCallback(suite=str(suite), cache_dir=str(eval_cache), batch_size=4)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)

    assert module.teacher_spec.loads == 1  # teacher scored once, then read from the cache
    assert all(module.modes)  # the student went back to training mode after each evaluation
    assert 0.0 <= trainer.callback_metrics["wintie/C_0"].item() <= 1.0

    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "wintie/C_0",
        "wintie/C_0.05",
        "wintie/alpha_star",
        "wintie/recovery/piqa",
        "wintie/score/boolq",
    ):
        assert tag in scalars, (tag, scalars)
    c0 = events.Scalars("wintie/C_0")
    assert [e.step for e in c0] == [1, 3]  # end of epoch 1 and 2 (2 steps per epoch)
    assert all(0.0 <= e.value <= 1.0 for e in c0)
    alpha_star = events.Scalars("wintie/alpha_star")[-1].value
    assert math.isnan(alpha_star) or 0.0 <= alpha_star <= 0.5
    curves = events.Images("wintie/curve")
    assert len(curves) == 2 and curves[0].encoded_image_string[:4] == b"\x89PNG"
