"""Test-only callbacks used by the reliability tests (imported by class path from CLI subprocesses)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lit_xdistill.modules import KDModule


class BatchRecorder(L.Callback):
    """Appends ``<global_step> <sha1 of the batch's input_ids>`` to a file before every training step.

    Args:
        path: the record file (appended to, flushed and fsync'ed per line, so it survives SIGKILL).
        sleep: seconds to wait after each step, so that a test can kill the run between steps.
    """

    def __init__(self, path: str, sleep: float = 0.0) -> None:
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        digest = hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()
        with self.path.open("a") as handle:
            handle.write(f"{trainer.global_step} {digest}\n")
            handle.flush()
            os.fsync(handle.fileno())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.sleep)


class PoisonedKD(KDModule):
    """``KDModule`` whose loss (or one parameter's gradient) is made non-finite at chosen steps.

    Args:
        poison_steps: global steps to poison.
        poison: ``loss`` (loss times NaN, so every gradient is NaN) or the name of one parameter whose
            gradient is set to +Inf after the backward pass (the loss stays finite).
        kwargs: ``KDModule`` arguments.
    """

    def __init__(self, poison_steps: list[int], poison: str = "loss", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poison_steps, self.poison = set(poison_steps), poison

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.poison == "loss" and self.trainer.global_step in self.poison_steps:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.poison != "loss" and self.trainer.global_step in self.poison_steps:
            self.get_parameter(self.poison).grad.fill_(float("inf"))


def read_records(path: Path) -> list[tuple[int, str]]:
    """The ``(global_step, digest)`` lines written by :class:`BatchRecorder`."""
    if not path.is_file():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(step), digest) for step, digest in rows]
