"""The distillation stages as LightningModules sharing one student model."""

from .alignment import AlignmentModule
from .base import StageHandoffError, StudentModule, StudentOptions
from .kd import KDModule
from .losses import kd_loss, topk_logprobs
from .merge import MergeModule

__all__ = ["AlignmentModule", "KDModule", "MergeModule", "StageHandoffError", "StudentModule",
           "StudentOptions", "kd_loss", "topk_logprobs"]
