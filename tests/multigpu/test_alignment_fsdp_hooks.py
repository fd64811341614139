"""Stage I (AlignmentModule) under FSDP, run for real on CPU: torch's FSDP1 works with gloo on CPU when it is
given ``device_id=cpu`` (Lightning's FSDPStrategy refuses a CPU accelerator, so the wrap is done here the way
``FSDPStrategy._setup_model`` does it, with configs/fsdp.yaml's policies, and the step goes through Lightning's
``_ForwardRedirection`` like ``Strategy.training_step``). Only ``sync_module_states`` is off: FSDP refuses it
for CPU tensors.

Without routing, the first backward fails as on the GPUs ("expected to be in states [FORWARD_BACKWARD] but
current state is TrainingState.IDLE"): each block's alignment loss leaves it through ``MixerContext.align_losses``,
not through its output, so FSDP's pre-backward hook of the block never runs. With it (``AlignmentModule`` installs
it under FSDPStrategy), 1 and 2 ranks give the gradients of the plain module."""

from __future__ import annotations

import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from multigpu_helpers import cpu_fsdp_strategy, free_port, init_gloo, wrap_like_lightning

B, S = 2, 24


def _batch() -> dict[str, torch.Tensor]:
    from lit_xdistill.models import document_positions

    ids = torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(1))
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * S])
    return {"input_ids": ids, "segment_ids": segments, "position_ids": document_positions(segments)}


def _module(teacher_dir: str):
    from lit_xdistill.modules import AlignmentModule
    from lit_xdistill.modules.base import StudentOptions
    from lit_xdistill.teachers import TeacherSpec

    module = AlignmentModule(teacher=TeacherSpec(teacher_dir, dtype="float32"), student=StudentOptions(window=8))
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    return module


def _plain_name(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _rank(rank: int, world: int, port: int, teacher_dir: str, route: bool, exact: bool, out: str) -> None:
    """One FSDP rank: configure the module under fsdp.yaml's strategy, wrap it like Lightning, one training
    step, backward and the gradient-norm logging; saves the loss, the full gradients and the logged norm (or
    the error it met). A collective that only some ranks join times out after 60 s."""
    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    import lit_xdistill.modules.alignment as alignment

    init_gloo(rank, world, port)
    try:
        strategy = cpu_fsdp_strategy(world)
        if exact:  # fp32 compute, so that the gradients compare tightly with the plain module's
            strategy.mixed_precision = None
        if not route:
            alignment.route_align_losses_through_blocks = lambda student: None
        module = _module(teacher_dir)
        module._trainer = SimpleNamespace(strategy=strategy, world_size=world, global_rank=rank)
        module.configure_model()
        wrapped = wrap_like_lightning(module, strategy)
        blocks = module.student.decoder_layers()
        assert all(isinstance(b, FullyShardedDataParallel) and isinstance(b._fsdp_wrapped_module, CheckpointWrapper)
                   for b in blocks), "not one checkpointed FSDP unit per block"
        loss = _ForwardRedirection()(wrapped, module, "training_step", _batch(), 0)
        loss.backward()
        # the logged gradient norm: a collective every rank must join, also one whose shards hold no gradient
        holds_grads = any(p.grad is not None for p in module.student.parameters())
        logged = {}
        module.log = lambda name, value, **kwargs: logged.update({name: value})
        module.on_before_optimizer_step(None)
        with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
            grads = {_plain_name(n).removeprefix("student."): p.grad.clone()
                     for n, p in module.named_parameters() if p.grad is not None and p.requires_grad}
            # a block's flat gradient spans its frozen parameters too: zeros there
            frozen = [p.grad for p in module.parameters() if p.grad is not None and not p.requires_grad]
            assert all(not g.any() for g in frozen), "a frozen parameter got a gradient"
        torch.save({"loss": loss.detach(), "grads": grads, "holds_grads": holds_grads,
                    "grad_norm": logged["train/grad_norm"]}, Path(out) / f"rank{rank}.pt")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, teacher_dir: Path, out: Path, route: bool = True, exact: bool = True) -> None:
    mp.spawn(_rank, args=(world, free_port(), str(teacher_dir), route, exact, str(out)), nprocs=world, join=True)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    from tiny_teachers import tiny_llama

    folder = tmp_path_factory.mktemp("teacher")
    tiny_llama(128).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(teacher_dir):
    """Loss and mixer gradients of the plain module (no FSDP, the side channel as it is)."""
    module = _module(str(teacher_dir))
    module.configure_model()
    loss = module.training_step(_batch(), 0)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None}


def test_unrouted_losses_fail_like_on_the_gpus(teacher_dir, tmp_path):
    _spawn(1, teacher_dir, tmp_path, route=False)
    error = (tmp_path / "error0.txt").read_text()
    assert "expected to be in states [<TrainingState.FORWARD_BACKWARD: 2>]" in error, error
    assert "current state is TrainingState.IDLE" in error, error


@pytest.mark.parametrize("world", [1, 2])
def test_routed_losses_give_the_plain_gradients(world, teacher_dir, reference, tmp_path):
    _spawn(world, teacher_dir, tmp_path)
    errors = sorted(tmp_path.glob("error*.txt"))
    assert not errors, errors[0].read_text()
    got = torch.load(tmp_path / "rank0.pt")
    ref_loss, ref_grads = reference
    torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-7)
    assert set(got["grads"]) == set(ref_grads) and all(".xdistill_mixer." in n for n in ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    ref_norm = torch.stack([g.norm() for g in ref_grads.values()]).norm()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:  # every rank logs the global norm
        torch.testing.assert_close(r["grad_norm"], ref_norm, rtol=1e-4, atol=1e-7)
    if world == 2:  # the case the collective used to miss: the mixers all lie in rank 0's shards
        assert [r["holds_grads"] for r in ranks] == [True, False]


def test_routed_losses_run_with_the_bf16_policy_of_fsdp_yaml(teacher_dir, tmp_path):
    """configs/fsdp.yaml as it is (bf16 parameters, fp32 reduce and buffers) on 2 ranks: the step runs and
    every mixer gets a finite gradient."""
    _spawn(2, teacher_dir, tmp_path, exact=False)
    errors = sorted(tmp_path.glob("error*.txt"))
    assert not errors, errors[0].read_text()
    grads = torch.load(tmp_path / "rank0.pt")["grads"]
    assert grads and all(g.isfinite().all() and g.abs().sum() > 0 for g in grads.values())
