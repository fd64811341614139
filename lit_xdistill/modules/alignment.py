"""Stage I: align every hybrid mixer to its teacher attention layer."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..teachers import TeacherSpec
from .base import StudentModule, StudentOptions

__all__ = ["AlignmentModule"]


class AlignmentModule(StudentModule):
    """Stage I (METHOD.md): per layer, MSE between the student mixer output and the teacher attention output.

    Runs the student in ``align`` mode: every layer computes the teacher's attention output (the frozen
    q/k/v are the teacher's, so this *is* the teacher's layer) and passes it on, so each mixer sees its
    teacher layer's input; the mixer's own output only enters the loss. No separate teacher model is
    held, and only the new mixer parameters (feature maps, gates) train.

    Args:
        teacher: the teacher to distill.
        student: how to build the student (``init_from`` is unusual here: stage I normally starts fresh).
        lr: peak learning rate (paper: 1e-2).
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr: learning rate at the end of the cosine decay (paper: 1e-5).
        weight_decay: AdamW weight decay.
        export_dir: write the aligned student here at the end of ``fit``.
    """

    lr_decay = "cosine"

    def __init__(self, teacher: TeacherSpec | None = None, student: StudentOptions | None = None, lr: float = 1e-2,
                 warmup_steps: int = 50, min_lr: float = 1e-5, weight_decay: float = 0.0,
                 export_dir: str | None = None):
        super().__init__(teacher, student, lr, warmup_steps, weight_decay, export_dir)
        self.final_lr_ratio = min_lr / lr
        # The frozen backbone is in eval mode on purpose; Lightning would warn about it at every fit start.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

    def select_trainable(self) -> None:
        self.student.requires_grad_(False)
        for mixer in self.student.mixers():
            mixer.requires_grad_(True)
        self.student.eval()  # frozen backbone: no dropout anywhere

    def train(self, mode: bool = True):
        super().train(mode)
        if self.student is not None:
            self.student.eval()
        return self

    def _align_losses(self, batch: dict[str, Tensor]) -> dict[int, Tensor]:
        out = self.student(**self.student_inputs(batch), align=True, logits_to_keep=1)
        return out.align_losses

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self._align_losses(batch)
        loss = torch.stack(list(losses.values())).sum()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # global-batch mean on N GPUs
        self.log_dict({f"align/mse/layer_{i:02d}": v.detach() for i, v in losses.items()})
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        losses = self._align_losses(batch)
        self.log("val/loss", torch.stack(list(losses.values())).sum(), prog_bar=True, sync_dist=True)
