"""Compiled decoder blocks (``compile_blocks``) in stage I: one graph for all identical blocks, as in stage II.

Regression: the mixer recorded its stage-I loss as ``ctx.align_losses[self.layer_idx] = ...`` inside the compiled
block, so dynamo guarded on the dict's keys (``not align_losses``, ``len(align_losses) == k``) and, behind those, on
the int module attribute ``layer_idx``: every block recompiled, and past ``recompile_limit`` (8) the rest of a
30-layer student ran eagerly (seen on an H100). Now the mixer leaves its loss under one fixed name and an eager
block hook files it per layer.

Backend ``aot_eager``: guards, graphs and recompiles are decided by dynamo whatever the backend, and AOTAutograd
still builds the compiled forward/backward pair through which the loss (a side effect of the graph, not its
output) must get its gradient. Inductor's C++ code generation would cost tens of seconds per graph on two CPU
cores and test nothing more here (tests/models/test_student.py compiles a block with inductor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_teachers import tiny_teacher
from torch._dynamo.utils import counters

from lit_xdistill.models import student_from_teacher
from lit_xdistill.modules.alignment import route_align_losses_through_blocks

LAYERS = 10  # more than dynamo's default recompile_limit (8): before the fix blocks 8 and 9 ran eagerly
B, S = 2, 24


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * S])  # packed documents, as in training
    return ids, segments


def _student(stage: str, route: bool = False):
    """A converted 10-layer student, in float64 so that compiled and eager agree to rounding of reordered sums;
    trainable parameters and modes as the stage sets them (``AlignmentModule.select_trainable``: mixers only,
    eval mode; stage II: everything, train mode)."""
    student = student_from_teacher(tiny_teacher("llama", num_hidden_layers=LAYERS), window=8, n_sinks=2,
                                   ogate_bias=0.0).double()
    if stage == "align":
        student.requires_grad_(False)
        for mixer in student.mixers():
            mixer.requires_grad_(True)
        student.eval()
        if route:  # what AlignmentModule installs under FSDP (here without FSDP: the hooks alone)
            route_align_losses_through_blocks(student)
    else:
        student.train()
    return student


def _align_step(student) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
    """One stage-I forward and backward (as ``AlignmentModule.training_step``): per-layer losses and gradients."""
    ids, segments = _inputs()
    losses = student(ids, segment_ids=segments, align=True, logits_to_keep=1).align_losses
    torch.stack(list(losses.values())).sum().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return {i: loss.detach() for i, loss in losses.items()}, grads


def _compiled(student):
    compiled = copy.deepcopy(student)
    compiled.compile_blocks(backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    return compiled


@pytest.mark.parametrize("route", [False, True], ids=["plain", "fsdp_routing_hooks"])
def test_stage_one_compiles_one_graph_for_all_blocks(route):
    """Two stage-I steps through 10 compiled blocks: no frame compiled twice (``error_on_recompile`` raises at the
    first recompile), one graph shared by all blocks (plus, with the FSDP routing hooks, one for the routing hook,
    also shared), no graph break; the per-layer losses and the mixer gradients are those of the eager student."""
    eager = _student("align", route)
    ref_losses, ref_grads = _align_step(eager)
    compiled = _compiled(eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        steps = [_align_step(compiled) for _ in range(2)]
    assert counters["stats"]["unique_graphs"] == (2 if route else 1), dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert sorted(ref_losses) == list(range(LAYERS))
    assert ref_grads and all(".xdistill_mixer." in n for n in ref_grads)  # only the mixers train in stage I
    assert torch.stack([g.norm() for g in ref_grads.values()]).norm() > 0
    # float64, and the compiled graph runs the eager ops, at most decomposed by AOTAutograd (reordered sums, ~1e-16
    # relative per operation; on CPU the results came out identical): 1e-9 leaves room for that and for no real
    # difference (a lost or doubled loss, a missing gradient path)
    for losses, grads in steps:
        assert sorted(losses) == sorted(ref_losses)
        for i, loss in ref_losses.items():
            torch.testing.assert_close(losses[i], loss, rtol=1e-9, atol=1e-12, msg=f"layer {i}")
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_stage_two_still_compiles_one_graph_for_all_blocks():
    """Stage II (no align, everything trains): one graph for the 10 blocks, no recompile, no graph break."""
    compiled = _compiled(_student("kd"))
    ids, segments = _inputs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(ids, segment_ids=segments, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])

