"""The distillation stages as LightningModules sharing one student model."""

from .alignment import AlignmentModule
from .base import StageHandoffError, StudentModule, StudentOptions
from .kd import KDModule
from .losses import kd_loss, topk_logprobs

__all__ = ["AlignmentModule", "KDModule", "StageHandoffError", "StudentModule", "StudentOptions", "kd_loss",
           "topk_logprobs"]
