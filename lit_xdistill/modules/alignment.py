"""Stage I: align every hybrid mixer to its teacher attention layer."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from ..models.mixer import HybridMixer, align_context
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

    def configure_model(self) -> None:
        fresh = self.student is None
        super().configure_model()
        if fresh and isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy):
            route_align_losses_through_blocks(self.student)

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


# -- FSDP: the per-layer losses must leave each block through its output -----------------------------------
# FSDP (FullyShardedDataParallel, what FSDPStrategy wraps with) drives a unit's backward from hooks on the tensors
# its forward *returned*: the pre-backward hook on those outputs unshards the unit's parameters and moves it to
# FORWARD_BACKWARD; the post-backward hook on its flat parameter (reduce-scatter, reshard) asserts that state.
# In align mode a block returns the teacher's output, which needs no gradient, and its mixer's MSE leaves through
# the ``MixerContext`` instead: the gradient then reaches the mixer without passing any output of the
# block, no pre-backward hook runs, and the first post-backward hook fails ("expected to be in states
# [FORWARD_BACKWARD] but current state is IDLE"; with FULL_SHARD the parameters would also still be sharded for
# the checkpoint recomputation). The two hooks below make the loss leave through the block's output (two view
# nodes per block, no computation, same gradients: tests/multigpu/test_alignment_fsdp_hooks.py); outside FSDP the
# side channel is fine and stays as it is.


class _RouteLoss(torch.autograd.Function):
    """(block output, block loss) -> views of the same two tensors, made outputs of one autograd node.

    Backward passes both gradients through unchanged. FSDP hooks the first output (the block's output) and the
    training loss is built from the second; autograd runs the hooks of all of a node's outputs before the node's
    backward (a hook of an output that got no gradient is called with None), so FSDP's pre-backward hook of
    the block runs before any gradient of its mixer is computed.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # no zero gradient of the block output is ever allocated
        return hidden.view_as(hidden), loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad_hidden: Tensor | None, grad_loss: Tensor | None):
        return grad_hidden, grad_loss


def _cut_stream(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: a block's inputs enter without autograd history (only stage I's forward).

    The routed block output requires grad; without the cut every later block would record (and backward would
    run) its whole frozen teacher computation against it. Stage I never trains through the stream, so no
    gradient changes. Runs inside the checkpointed region, identically in the recomputation."""
    if align_context(kwargs) is None:
        return None
    cut = lambda v: v.detach() if isinstance(v, Tensor) and v.requires_grad else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _route_block_loss(module: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: route the block's alignment loss through its output (``_RouteLoss``) and leave the routed loss
    pending in the context, where the student's own hook (``attach_align_recorder``, registered after this one or
    on the FSDP unit around the block) files it under the layer for ``AlignmentModule``.

    Reads no layer index: under ``compile_blocks`` dynamo traces block hooks as frames of their own, and a per-layer
    constant would make it compile this hook once per layer."""
    ctx = align_context(kwargs)
    if ctx is None or not torch.is_grad_enabled():
        return None
    loss = ctx.pending_align_loss
    if loss is None or not loss.requires_grad:
        return None
    hidden = output if isinstance(output, Tensor) else output[0]
    hidden, ctx.pending_align_loss = _RouteLoss.apply(hidden, loss)
    return hidden if isinstance(output, Tensor) else (hidden, *output[1:])


def route_align_losses_through_blocks(student) -> None:
    """Install the hooks above on every decoder block of ``student`` (FSDP units: see the comment above).

    Registered on the blocks themselves, before the strategy wraps them, so they run inside the FSDP unit (and
    inside its activation-checkpointing wrapper), on the output FSDP hooks."""
    for layer in student.decoder_layers():
        mixers = [m for m in layer.modules() if isinstance(m, HybridMixer)]
        if len(mixers) != 1:
            raise RuntimeError(f"expected one hybrid mixer per decoder block, found {len(mixers)}")
        layer.register_forward_pre_hook(_cut_stream, with_kwargs=True)
        layer.register_forward_hook(_route_block_loss, with_kwargs=True)
