"""The hybrid xLSTM student: config, model, generation cache, and conversion from a teacher."""

from .cache import HybridCache
from .configuration_xdistill import MIXER_KINDS, XDistillConfig
from .modeling_xdistill import (
    XDistillForCausalLM,
    XDistillOutput,
    document_positions,
    student_from_teacher,
    uninitialised_student,
)

__all__ = [
    "MIXER_KINDS",
    "HybridCache",
    "XDistillConfig",
    "XDistillForCausalLM",
    "XDistillOutput",
    "document_positions",
    "student_from_teacher",
    "uninitialised_student",
]
