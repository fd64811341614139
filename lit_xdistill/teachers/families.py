"""Per-family adapters: where a teacher's attention lives and what the student conversion must check.

The student reuses the teacher's own decoder code (transformers' modeling files) and only swaps the
attention *function* that each attention module calls after its q/k/v projections, q/k norms, RoPE and
GQA bookkeeping. So an adapter is small: it names the decoder layers and the attention module, and it
rejects configurations whose attention is not plain softmax attention (logit soft-capping, ALiBi, ...).

To add a family: check that its attention module calls ``ALL_ATTENTION_FUNCTIONS`` (every modern
transformers model does), add a ``FamilyAdapter`` to ``FAMILIES`` under its ``config.model_type``, and
add it to the tiny-teacher test in ``tests/models/test_conversion.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["FamilyAdapter", "FAMILIES", "UnsupportedTeacherError", "adapter_for"]


class UnsupportedTeacherError(ValueError):
    """The teacher's architecture cannot be converted into a hybrid student."""


def _no_softcap(config) -> str | None:
    cap = getattr(config, "attn_logit_softcapping", None)
    return f"attention logit soft-capping ({cap}) is not supported by the hybrid mixer" if cap else None


@dataclass(frozen=True)
class FamilyAdapter:
    """How one transformers model family is laid out.

    Args:
        model_type: ``config.model_type`` of the family.
        layers_attr: dotted path from the CausalLM to the ``nn.ModuleList`` of decoder layers.
        attention_attr: attribute of a decoder layer that holds its attention module.
        checks: functions ``config -> error message or None`` for unsupported variants.
        notes: what the family's attention does before the attention function (for the docs).
    """

    model_type: str
    layers_attr: str = "model.layers"
    attention_attr: str = "self_attn"
    checks: tuple[Callable[[object], str | None], ...] = field(default=(_no_softcap,))
    notes: str = ""

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a CausalLM of this family."""
        obj = model
        for part in self.layers_attr.split("."):
            obj = getattr(obj, part)
        return obj

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer."""
        return getattr(layer, self.attention_attr)

    def check(self, config) -> None:
        """Raise ``UnsupportedTeacherError`` if this config uses an attention variant we cannot convert."""
        for check in self.checks:
            problem = check(config)
            if problem:
                raise UnsupportedTeacherError(f"{config.model_type}: {problem}.")


FAMILIES: dict[str, FamilyAdapter] = {
    a.model_type: a
    for a in [
        FamilyAdapter("llama", notes="q/k/v/o, RoPE, GQA"),
        FamilyAdapter("mistral", notes="as llama; optional teacher sliding window"),
        FamilyAdapter("qwen2", notes="q/k/v biases; optional teacher sliding window"),
        FamilyAdapter("qwen3", notes="per-head RMSNorm on q and k before RoPE"),
        FamilyAdapter("olmo2", notes="RMSNorm on the full q and k projections before RoPE"),
        FamilyAdapter("olmo3", notes="as olmo2, plus sliding-window layers"),
        FamilyAdapter("gemma3_text", notes="per-head q/k norms, query_pre_attn_scalar, local/global layers"),
    ]
}


def adapter_for(config) -> FamilyAdapter:
    """The adapter for a teacher config, or a clear error listing the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":  # multimodal wrapper: the text model is what we distill
        model_type = "gemma3_text"
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise UnsupportedTeacherError(
            f"Teacher family {model_type!r} is not supported. Supported: {', '.join(sorted(FAMILIES))}. "
            "To add one, register a FamilyAdapter in lit_xdistill/teachers/families.py "
            "(see its module docstring)."
        )
    adapter.check(config)
    return adapter
