"""The hybrid xLSTM student as a transformers model.

``XDistillForCausalLM`` wraps a CausalLM of the teacher's own architecture (``self.backbone``) whose
attention modules call the hybrid mixer (see ``mixer.py``). Everything but the mixer is the teacher's
code and, after ``student_from_teacher``, the teacher's weights, bit for bit.

Inputs beyond the usual ones: ``segment_ids`` (B, S) marks packed documents (the mLSTM state and the
attention masks reset where it changes) and ``position_ids`` restart per document. Without them, an
``attention_mask`` with left padding is turned into two documents (padding, then the text), so a padded
row gives the same logits as the row alone.

Generation: ``generate()`` uses the plain ``HybridCache`` (the reference); ``generate(...,
cache_implementation="static")`` the fast path (``decoding.py``): a ``StaticHybridCache`` updated in place and,
on CUDA, the one-token decode step compiled (unless ``disable_compile=True``) and replayed as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..teachers.families import adapter_for
from .cache import HybridCache
from .configuration_xdistill import XDistillConfig
from .decoding import StaticHybridCache
from .mixer import (
    ATTENTION_NAME,
    HybridMixer,
    MixerContext,
    attach_align_recorder,
    attach_mixer,
    cache_doc_len,
    head_layout,
)

__all__ = ["XDistillForCausalLM", "XDistillOutput", "student_from_teacher", "document_positions"]


@dataclass
class XDistillOutput(ModelOutput):
    """Causal-LM output: loss, logits, the decoding cache, and stage I's per-layer losses (layer -> MSE)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: HybridCache | None = None
    align_losses: dict[int, Tensor] | None = None


def document_positions(segment_ids: Tensor) -> Tensor:
    """Position of every token within its document: (B, S) ids -> (B, S) positions restarting at 0."""
    B, S = segment_ids.shape
    idx = torch.arange(S, device=segment_ids.device).expand(B, S)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_idx = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


class XDistillPreTrainedModel(PreTrainedModel):
    """Base class: config class, checkpointing flags and init of the new mixer parameters."""

    config_class = XDistillConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, HybridMixer):
            module.reset_parameters()


class XDistillForCausalLM(XDistillPreTrainedModel, GenerationMixin):
    """Hybrid xLSTM student (mLSTM + sliding-window attention with sinks in every layer).

    Args:
        config: an ``XDistillConfig`` holding the teacher's config and the mixer settings.
    """

    def __init__(self, config: XDistillConfig):
        super().__init__(config)
        from .mixer import register_attention_function

        register_attention_function()
        inner = config.inner_config()
        self.backbone = AutoModelForCausalLM.from_config(inner, attn_implementation=ATTENTION_NAME)
        adapter = adapter_for(inner)
        num_heads, head_dim = head_layout(inner)
        for idx, (layer, kind) in enumerate(zip(adapter.decoder_layers(self.backbone), config.layer_mixers())):
            mixer = HybridMixer(config, kind, inner.hidden_size, num_heads, head_dim, idx)
            attach_mixer(adapter.attention(layer), mixer)
        self.post_init()

    # -- plumbing that generate(), lm-eval and tied weights rely on -------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder blocks (what FSDP wraps and activation checkpointing recomputes)."""
        return adapter_for(self.backbone.config).decoder_layers(self.backbone)

    def compile_blocks(self, backend: str | Callable = "inductor") -> None:
        """``torch.compile`` each decoder block in place (``nn.Module.compile``: parameter names, checkpoints and
        FSDP wrapping stay as they are). Identical blocks share one compiled graph, in stage I (``align``) as in
        stage II; static shapes, as in training.

        Args:
            backend: the ``torch.compile`` backend (tests use ``"eager"``: dynamo's guards and graphs, no codegen).
        """
        for layer in self.decoder_layers():
            layer.compile(dynamic=False, backend=backend)

    def mixers(self) -> list[HybridMixer]:
        """The hybrid mixers, one per layer."""
        return [m for m in self.modules() if isinstance(m, HybridMixer)]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own constant-size cache (HybridCache)

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: HybridCache | None = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      logits_to_keep: int | None = None, **kwargs) -> dict:
        if cache is not None and not cache.is_empty:
            input_ids = input_ids[:, cache.seen_tokens :]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if logits_to_keep is not None:  # generate() asks for the last position's logits only (not the prompt's)
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _update_model_kwargs_for_generation(self, outputs: XDistillOutput, model_kwargs: dict, *args,
                                            **kwargs) -> dict:
        # transformers 5.17 hands back only caches named past_key_values, so without this every step would
        # recompute the whole sequence (5.24 hands back `cache` itself)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if outputs.cache is not None:
            model_kwargs["cache"] = outputs.cache
        return model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        # cache_implementation="static" selects the fast path; otherwise forward() makes a plain HybridCache.
        # Its decode step is compiled on CUDA unless disable_compile, as transformers compiles a static-cache
        # forward (our cache compiles its own step: is_compileable stays False).
        if (generation_config.cache_implementation == "static" and model_kwargs.get("cache") is None
                and generation_config.use_cache):
            rows = batch_size * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
            max_len = max(max_cache_length, getattr(generation_config, "max_cache_len", None) or 0)
            compile_step = self.device.type == "cuda" and not getattr(generation_config, "disable_compile", False)
            model_kwargs["cache"] = self.static_cache(rows, max_len, compile_step=compile_step)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)

    def static_cache(self, batch_size: int, max_cache_len: int, compile_step: bool = False) -> StaticHybridCache:
        """A reset ``StaticHybridCache`` for ``batch_size`` rows, reused while batch size, device, dtype and
        ``compile_step`` stay the same and (with ``attention`` mixers) it is long enough, so that its buffers, CUDA
        graph and compiled step are made once, not per generate call.

        Args:
            batch_size: rows B.
            max_cache_len: longest document a full-attention layer must hold (prompt plus new tokens).
            compile_step: compile the decode step with inductor before its CUDA-graph capture (2x the decode
                tokens/s of the SmolLM2 student on an H100, docs/benchmarks.md; the first step pays the compilation).
        """
        key = (batch_size, self.device, self.dtype, compile_step)
        held = getattr(self, "_static_cache", None)
        long_enough = held is not None and (held[1].max_cache_len >= max_cache_len
                                            or all(m.kind != "attention" for m in self.mixers()))
        if held is not None and held[0] == key and long_enough:
            held[1].reset()
            return held[1]
        cache = StaticHybridCache(batch_size=batch_size, max_cache_len=max_cache_len, compile_step=compile_step)
        self._static_cache = (key, cache)
        return cache

    def decode_step(self, input_ids: Tensor, cache: StaticHybridCache) -> Tensor:
        """One token per row (B, 1) continuing a static cache -> logits (B, 1, V); advances ``cache.doc_len`` in
        place. Fixed shapes, in-place updates and no host synchronisation: the step ``DecodeGraph`` captures."""
        ctx = MixerContext(cache=cache, continuing=True)
        logits = self.backbone(input_ids=input_ids, position_ids=cache.doc_len[:, None], use_cache=False,
                               xdistill_ctx=ctx).logits
        cache.doc_len.add_(1)
        return logits

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        align: bool = False,
        **kwargs,
    ) -> XDistillOutput:
        """Causal LM forward.

        Args:
            input_ids: (B, S) token ids.
            attention_mask: (B, S) 1 for tokens, 0 for padding (left or right); used only when no
                ``segment_ids`` are given and no cache is being continued.
            position_ids: (B, S) RoPE positions; derived from the documents when omitted.
            segment_ids: (B, S) document ids of packed sequences.
            cache: a ``HybridCache`` to continue, created when ``use_cache`` and none is given; or a
                ``StaticHybridCache``, whose one-token steps (no labels, positions or embeddings given) go through
                ``decode_step`` and return logits only.
            use_cache: return a cache for decoding.
            labels: (B, S) HF-style labels (shifted inside), -100 ignored.
            inputs_embeds: (B, S, hidden) instead of input_ids.
            logits_to_keep: keep logits of the last N positions only (0: all).
            align: stage I mode: every layer passes the teacher's attention output on and records the
                MSE of the student mixer against it in ``align_losses``.
        """
        ref = input_ids if input_ids is not None else inputs_embeds
        B, S = ref.shape[:2]
        if use_cache and cache is None:
            cache = HybridCache(batch_size=B)
        continuing = cache is not None and not cache.is_empty
        if (continuing and S == 1 and isinstance(cache, StaticHybridCache) and input_ids is not None
                and position_ids is None and labels is None and not align):
            return XDistillOutput(logits=cache.decode(self, input_ids), cache=cache)
        if continuing:
            # generate() and chunked prefill: the new tokens continue each row's current document
            segment_ids = None
            if position_ids is None:
                position_ids = cache.doc_len[:, None] + torch.arange(S, device=ref.device)
        else:
            if segment_ids is None and attention_mask is not None and not bool(attention_mask.all()):
                segment_ids = attention_mask.long()
            if position_ids is None:
                position_ids = (document_positions(segment_ids) if segment_ids is not None
                                else torch.arange(S, device=ref.device).expand(B, S))
        ctx = MixerContext(segment_ids=segment_ids, cache=cache, continuing=continuing, align=align,
                           prompt_doc_len=(cache_doc_len(segment_ids, B, S, ref.device)
                                           if cache is not None and not continuing else None))
        # stage I: the mixers leave their losses pending, these hooks file them per layer (mixer.py says why)
        recorders = ([attach_align_recorder(layer, idx) for idx, layer in enumerate(self.decoder_layers())]
                     if align else [])
        try:
            out = self.backbone(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                labels=labels,
                use_cache=False,
                logits_to_keep=logits_to_keep,
                xdistill_ctx=ctx,
                **kwargs,
            )
        finally:
            for handle in recorders:
                handle.remove()
        if ctx.pending_align_loss is not None:  # a block's hook never saw the context: a loss would be lost
            raise RuntimeError("stage I: a mixer's alignment loss was not filed under its layer (the decoder block "
                               "was called without xdistill_ctx in its keyword arguments)")
        if cache is not None:
            cache.advance(cache.doc_len + S if continuing else ctx.prompt_doc_len, S)
        return XDistillOutput(loss=out.loss, logits=out.logits, cache=cache,
                              align_losses=ctx.align_losses if align else None)


def uninitialised_student(config: XDistillConfig, device: torch.device | str,
                          dtype: torch.dtype = torch.float32) -> XDistillForCausalLM:
    """The student ``config`` describes, with storage on ``device`` that nothing has written.

    Built on the meta device (no random initialisation), parameters cast to ``dtype`` there (buffers keep the
    fp32 they are built with), then given storage and re-tied: materialising a meta module unties shared
    weights (SmolLM2's lm_head would become a parameter of its own).

    Args:
        config: the student's config.
        device: where the (uninitialised) storage goes.
        dtype: dtype of the parameters.
    """
    with torch.device("meta"):
        student = XDistillForCausalLM(config).float()
    for param in student.parameters():
        param.data = param.data.to(dtype)  # on meta: nothing is allocated; tied parameters stay one object
    student.to_empty(device=device)
    student.tie_weights()
    return student


def student_from_teacher(teacher: PreTrainedModel, teacher_identity: str | None = None,
                         **mixer_options) -> XDistillForCausalLM:
    """Convert a teacher CausalLM into a hybrid student with the teacher's weights copied bit for bit.

    Args:
        teacher: a transformers CausalLM of a supported family (see ``lit_xdistill.teachers.FAMILIES``).
        teacher_identity: the teacher's ``TeacherSpec.identity``, recorded for stage hand-off checks.
        **mixer_options: any ``XDistillConfig`` mixer argument (``mixer``, ``window``, ``n_sinks``, ...).
    """
    adapter_for(teacher.config)  # fail fast with the list of supported families
    config = XDistillConfig(teacher_config=teacher.config.to_dict(), teacher_identity=teacher_identity,
                            **mixer_options)
    # uninitialised: every backbone tensor is overwritten by the teacher's below, and random-initialising them
    # first cost minutes of CPU per rank for an 8B teacher (issue 7)
    student = uninitialised_student(config, teacher.device, teacher.dtype)
    # Non-persistent buffers (RoPE's inv_freq) are not in the state dict: copy them with their dtype,
    # which from_pretrained(dtype=bf16) leaves at fp32 and a plain .to(bf16) would round.
    teacher_buffers = dict(teacher.named_buffers())
    for name, _ in list(student.named_buffers()):
        backbone_name = name.removeprefix("backbone.")
        if backbone_name not in teacher_buffers:
            raise RuntimeError(f"student buffer {name} has no teacher counterpart to copy (left uninitialised)")
        owner, _, attr = name.rpartition(".")
        student.get_submodule(owner)._buffers[attr] = teacher_buffers[backbone_name].clone()
    missing, unexpected = student.backbone.load_state_dict(teacher.state_dict(), strict=False)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    missing = [k for k in missing if ".xdistill_mixer." not in k]
    if missing or unexpected:
        raise RuntimeError(f"teacher -> student weight copy mismatch: missing={missing} unexpected={unexpected}")
    # The backbone's own _init_weights also visits the attached mixers (as plain Linears); set the
    # documented initial values last.
    for mixer in student.mixers():
        mixer.reset_parameters()
    return student.to(teacher.device)
