"""Configuration of the hybrid xLSTM student."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

__all__ = ["XDistillConfig", "MIXER_KINDS", "FEATURE_MAPS", "POINTWISE_BACKENDS"]

# Per-layer mixers. "hybrid" is the paper's student; the others exist for ablations.
MIXER_KINDS = ("hybrid", "mlstm", "swa", "linear", "attention")
FEATURE_MAPS = ("softmax_pm", "softmax")
POINTWISE_BACKENDS = ("auto", "triton", "torch")


class XDistillConfig(PretrainedConfig):
    """A teacher's config plus the hybrid mixer settings.

    The student keeps the teacher's whole macro-architecture, so the teacher's config is stored as a
    dict (``teacher_config``) and rebuilt with ``AutoConfig.for_model``; everything here describes only
    the mixer that replaces softmax attention.

    Args:
        teacher_config: the teacher's ``config.to_dict()``.
        mixer: one mixer kind for every layer, or one per layer: ``hybrid`` (mLSTM + sliding window +
            sinks, mixed by a per-head gate), ``mlstm`` (mLSTM only), ``swa`` (sliding window + sinks
            only), ``linear`` (plain normalised linear attention: mLSTM with constant gates) or
            ``attention`` (keep the teacher's softmax attention).
        window: sliding-window size W of the attention branch (keys i-W < j <= i).
        n_sinks: number of attention-sink tokens (the first tokens of each document).
        feature_map: ``softmax_pm`` ([softmax(xW), softmax(-xW)], Hedgehog style) or ``softmax``.
        feature_dim: total feature dimension per head (defaults to the head dim, so the kernels see
            DQK = head dim).
        igate_bias: initial input-gate bias.
        fgate_bias_range: forget-gate biases are spread linearly over the heads in this range.
        ogate_bias: initial output-gate bias (negative: start close to the sliding-window branch).
        gate_softcap: soft-cap ``c * tanh(x / c)`` on the input and forget gate pre-activations.
        mlstm_backend: ``auto`` (Triton on CUDA, torch chunkwise on CPU), ``triton``, ``chunkwise``,
            ``parallel`` or ``recurrent`` (see ``xdistill_kernels.mlstm``).
        attention_backend: ``auto``, ``flex`` or ``sdpa`` (see ``xdistill_kernels.attention``).
        pointwise_backend: the mixer's feature maps, gate activations and output mix: ``auto`` (fused
            Triton kernels on CUDA, plain torch otherwise), ``triton`` (fused; on CPU only under
            ``TRITON_INTERPRET=1``) or ``torch`` (the reference: one torch op each). Same math either way.
        teacher_identity: id of the teacher the student was converted from (checked at stage hand-off).
        lineage: free-form provenance (stage history, seed student) used by merging.
    """

    model_type = "xdistill"

    def __init__(
        self,
        teacher_config: dict | None = None,
        mixer: str | list[str] = "hybrid",
        window: int = 512,
        n_sinks: int = 4,
        feature_map: str = "softmax_pm",
        feature_dim: int | None = None,
        igate_bias: float = 4.0,
        fgate_bias_range: tuple[float, float] = (3.0, 6.0),
        ogate_bias: float = -4.0,
        gate_softcap: float = 15.0,
        mlstm_backend: str = "auto",
        attention_backend: str = "auto",
        pointwise_backend: str = "auto",
        teacher_identity: str | None = None,
        lineage: dict | None = None,
        **kwargs,
    ):
        self.teacher_config = teacher_config or {}
        self.mixer = mixer
        self.window = window
        self.n_sinks = n_sinks
        self.feature_map = feature_map
        self.feature_dim = feature_dim
        self.igate_bias = igate_bias
        self.fgate_bias_range = tuple(fgate_bias_range)
        self.ogate_bias = ogate_bias
        self.gate_softcap = gate_softcap
        self.mlstm_backend = mlstm_backend
        self.attention_backend = attention_backend
        self.pointwise_backend = pointwise_backend
        self.teacher_identity = teacher_identity
        self.lineage = lineage or {}
        if self.teacher_config:
            inner = self.inner_config()
            # Mirror what generate(), lm-eval and PreTrainedModel read from the top-level config.
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
                kwargs.setdefault(key, getattr(inner, key, None))
            kwargs.setdefault("tie_word_embeddings", getattr(inner, "tie_word_embeddings", False))
        super().__init__(**kwargs)
        self.validate_mixer()

    def inner_config(self) -> PretrainedConfig:
        """The teacher-architecture config the student's backbone is built from."""
        params = dict(self.teacher_config)
        # dtype is decided by whoever builds or loads the student, not by the teacher's checkpoint
        params.pop("dtype", None)
        params.pop("torch_dtype", None)
        return AutoConfig.for_model(params.pop("model_type"), **params)

    def layer_mixers(self) -> list[str]:
        """The mixer kind of every layer."""
        n_layers = self.inner_config().num_hidden_layers
        mixers = [self.mixer] * n_layers if isinstance(self.mixer, str) else list(self.mixer)
        if len(mixers) != n_layers:
            raise ValueError(f"mixer lists {len(mixers)} kinds but the teacher has {n_layers} layers")
        return mixers

    def validate_mixer(self) -> None:
        """Reject bad mixer settings with a message naming the allowed values."""
        kinds = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        bad = sorted({k for k in kinds if k not in MIXER_KINDS})
        if bad:
            raise ValueError(f"unknown mixer kind(s) {bad}; choose from {', '.join(MIXER_KINDS)}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {self.feature_map!r}; choose from {', '.join(FEATURE_MAPS)}")
        if self.pointwise_backend not in POINTWISE_BACKENDS:
            raise ValueError(f"unknown pointwise_backend {self.pointwise_backend!r}; "
                             f"choose from {', '.join(POINTWISE_BACKENDS)}")
        if self.window < 1 or self.n_sinks < 0:
            raise ValueError(f"window must be >= 1 and n_sinks >= 0 (got {self.window}, {self.n_sinks})")
        if self.feature_dim is not None and self.feature_map == "softmax_pm" and self.feature_dim % 2:
            raise ValueError(f"feature_dim must be even for softmax_pm (got {self.feature_dim})")
