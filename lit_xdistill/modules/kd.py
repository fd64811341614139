"""Stage II: knowledge distillation with 0.9 CE + 0.1 top-k KL, from a logit cache or a live teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import XDistillForCausalLM, student_from_teacher
from ..teachers import TeacherSpec
from .base import StudentModule, StudentOptions, empty_student
from .losses import kd_loss, topk_logprobs

__all__ = ["KDModule"]


class KDModule(StudentModule):
    """Stage II (METHOD.md): full fine-tuning of the student against the teacher's top-k distribution.

    The teacher comes from the batch (``topk_ids``/``topk_logprobs``, written once by
    ``lit-xdistill cache_logits`` and attached by the DataModule's ``logit_cache``) or, when the batch
    has none, from a live frozen teacher held outside the checkpoint. Loss and its KL convention:
    ``lit_xdistill.modules.losses``.

    Args:
        teacher: the teacher to distill.
        student: how to build or where to load the student (``init_from``: the stage-I export).
        lr: learning rate after warm-up (paper: 1e-5, constant).
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay (paper: 0.1).
        ce_weight: weight of the next-token cross-entropy (paper: 0.9).
        kl_weight: weight of KL(teacher || student) on the top-k (paper: 0.1).
        top_k: teacher tokens kept per position for a live teacher (the cache fixes its own k).
        train_params: ``all`` (paper) or ``mixer`` (only the new mixer parameters).
        export_dir: write the distilled student here at the end of ``fit``.
    """

    def __init__(self, teacher: TeacherSpec | None = None, student: StudentOptions | None = None, lr: float = 1e-5,
                 warmup_steps: int = 100, weight_decay: float = 0.1, ce_weight: float = 0.9, kl_weight: float = 0.1,
                 top_k: int = 256, train_params: str = "all", export_dir: str | None = None):
        super().__init__(teacher, student, lr, warmup_steps, weight_decay, export_dir)
        if train_params not in ("all", "mixer"):
            raise ValueError(f"train_params must be 'all' or 'mixer', got {train_params!r}")
        if ce_weight < 0 or kl_weight < 0 or ce_weight + kl_weight == 0:
            raise ValueError(f"ce_weight and kl_weight must be >= 0 and not both 0 (got {ce_weight}, {kl_weight})")
        self.ce_weight, self.kl_weight, self.top_k, self.train_params = ce_weight, kl_weight, top_k, train_params
        self._live_teacher: nn.Module | None = None

    def select_trainable(self) -> None:
        self.student.requires_grad_(self.train_params == "all")
        for mixer in self.student.mixers():
            mixer.requires_grad_(True)

    def live_teacher(self) -> nn.Module:
        """The frozen teacher, wrapped so that packed documents are masked like in the student.

        Under FSDP on several GPUs it is sharded like the student (one unit per decoder block, bf16 compute,
        no optimizer state), so each GPU holds 1/N of it; with ``sync_module_states`` only rank 0 reads its
        weights (the others build it empty and receive rank 0's by broadcast, as for the student).
        """
        if self._live_teacher is None:
            fsdp = self._fsdp_strategy()
            if self._rank_zero_builds_alone():
                teacher = empty_student(None, self.teacher_spec, StudentOptions(mixer="attention"),
                                        dtype=self.teacher_spec.torch_dtype())  # rank 0's: the broadcast pairs up
            else:
                hf = self.teacher_spec.load_model()
                teacher = student_from_teacher(hf, self.teacher_spec.identity, mixer="attention")
            teacher = teacher.requires_grad_(False).eval()
            if fsdp is not None:
                teacher = _shard_teacher(teacher, fsdp)
            # object.__setattr__: a plain attribute, not a submodule, so it stays out of checkpoints
            object.__setattr__(self, "_live_teacher", teacher)
        return self._live_teacher.to(self.device)

    def teacher_topk(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Teacher top-k ids and log-probs for the batch: from the cache if present, else computed live."""
        if "topk_ids" in batch:
            return batch["topk_ids"], batch["topk_logprobs"]
        with torch.no_grad():
            return topk_logprobs(self.live_teacher()(**self.student_inputs(batch)).logits, self.top_k)

    def _losses(self, batch: dict[str, Tensor]):
        topk_ids, topk_lp = self.teacher_topk(batch)
        logits = self.student(**self.student_inputs(batch)).logits
        return kd_loss(logits, batch["labels"], topk_ids, topk_lp, self.ce_weight, self.kl_weight)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._losses(batch)
        # sync_dist: the mean over ranks, so a run on N GPUs logs the loss of its whole global batch
        self.log("train/loss", out.loss, prog_bar=True, sync_dist=True)
        self.log_dict({"train/ce": out.ce, "train/kl": out.kl}, sync_dist=True)
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self._losses(batch)
        self.log_dict({"val/loss": out.loss, "val/ce": out.ce, "val/kl": out.kl, "val/ppl": out.ce.exp()},
                      prog_bar=True, sync_dist=True)


def _shard_teacher(teacher: XDistillForCausalLM, strategy) -> nn.Module:
    """Wrap the frozen teacher in its own FSDP root: one unit per decoder block, the run's sharding strategy,
    bf16 parameters with fp32 buffers (RoPE), and rank 0's weights broadcast when the strategy says so."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(layer) for layer in teacher.decoder_layers()}
    return FullyShardedDataParallel(
        teacher,
        auto_wrap_policy=ModuleWrapPolicy(blocks),
        sharding_strategy=strategy.sharding_strategy,
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16, buffer_dtype=torch.float32),
        device_id=strategy.root_device.index,
        use_orig_params=True,
        sync_module_states=bool(strategy.kwargs.get("sync_module_states")),
    )
