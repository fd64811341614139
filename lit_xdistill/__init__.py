"""lit-xdistill: distill transformer LLMs into hybrid xLSTM students with Lightning.

Importing the package registers the student with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(<exported student folder>)`` works after ``import lit_xdistill``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .models import XDistillConfig, XDistillForCausalLM, student_from_teacher
from .teachers import TeacherSpec

__version__ = "0.1.0"

AutoConfig.register(XDistillConfig.model_type, XDistillConfig, exist_ok=True)
AutoModelForCausalLM.register(XDistillConfig, XDistillForCausalLM, exist_ok=True)

__all__ = ["TeacherSpec", "XDistillConfig", "XDistillForCausalLM", "student_from_teacher", "__version__"]
