"""End-of-fit export under FSDP, run for real on CPU with 2 gloo ranks (the wrap is done as in
test_alignment_fsdp_hooks.py: configs/fsdp.yaml's strategy and bf16 policy, ``device_id=cpu``, only
``sync_module_states`` off).

The reported crash: rank 0 died of SIGSEGV in ``gathered_student_state`` (align and KD alike), in
torch/distributed/fsdp/_state_dict_utils.py ``param_hook`` (``state_dict[fqn].detach().clone()``), under
``get_model_state_dict(full_state_dict=True, cpu_offload=True)``. Cause, in torch's FSDP1 and on CPU only:
``cpu_offload`` selects ``FullStateDictConfig(offload_to_cpu=True, rank0_only=True)``; on rank 0 the unshard
context then enters ``FlatParamHandle.to_cpu()``, which does ``flat_param.data = flat_param.to("cpu")`` and
frees the gathered (padded unsharded) flat parameter. On a GPU ``.to("cpu")`` is a copy and the free drops
the GPU buffer; on CPU it is the same tensor, so the free resizes the storage that the flat parameter and
every parameter view still point at to 0 bytes, and the clone reads freed memory (pytorch#188989;
Lightning-AI/pytorch-lightning#21804 hits the same in Lightning's own full checkpoints on CPU).
``test_torch_frees_the_parameters_it_offloads_on_cpu`` shows that directly, without crashing.

``StudentModule.gathered_student_state`` therefore offloads only from an accelerator; on CPU every rank
gathers, rank 0 keeps the state and the others drop it. The other tests check the behaviour: rank 0's
gathered state is the plain (unsharded) student's state dict in fp32, the exported folder holds exactly
the weights of the plain student's ``save_pretrained``, only rank 0 writes, and every rank leaves after it.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from multigpu_helpers import cpu_fsdp_strategy, init_gloo, spawn_ranks, wrap_like_lightning

B, S, K = 2, 24, 4
WORLD = 2
DEADLINE_S = 150  # the whole 2-rank run; a collective that only one rank joins times out after 60 s


def _module(stage: str, teacher_dir: str, export_dir: str | None = None):
    from lit_xdistill.modules import AlignmentModule, KDModule
    from lit_xdistill.modules.base import StudentOptions
    from lit_xdistill.teachers import TeacherSpec

    cls = {"align": AlignmentModule, "kd": KDModule}[stage]
    module = cls(teacher=TeacherSpec(teacher_dir, dtype="float32"), student=StudentOptions(window=8),
                 export_dir=export_dir)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    return module


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Stage I's inputs plus stage II's labels and a cached teacher top-k (so KD needs no live teacher)."""
    from lit_xdistill.models import document_positions

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, S), generator=gen)
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * S])
    return {"input_ids": ids, "segment_ids": segments, "position_ids": document_positions(segments),
            "labels": torch.roll(ids, -1, 1), "topk_ids": torch.randint(0, vocab, (B, S, K), generator=gen),
            "topk_logprobs": torch.randn(B, S, K, generator=gen).log_softmax(-1) - 1.0}


def _timed(fn, times: list[float]):
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        times.append(time.time())
        return result

    return wrapper


def _rank(rank: int, world: int, port: int, teacher_dir: str, out: str) -> None:
    """One FSDP rank: for stage I and stage II, build the module under fsdp.yaml's strategy, wrap it like
    Lightning, one training step and backward (no optimizer step: the weights stay the converted ones),
    then the gather and the end-of-fit export (``on_train_end``) as in a real run. Saves what it gathered
    and how often it exported; a crash leaves its stack in fault<rank>.txt."""
    import faulthandler

    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import FullyShardedDataParallel

    fault = open(Path(out) / f"fault{rank}.txt", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.enable(fault)
    init_gloo(rank, world, port)
    record: dict = {}
    try:
        strategy = cpu_fsdp_strategy(world)
        for stage in ("align", "kd"):
            module = _module(stage, teacher_dir, export_dir=str(Path(out) / stage / "student"))
            module._trainer = SimpleNamespace(strategy=strategy, world_size=world, global_rank=rank,
                                              is_global_zero=rank == 0, datamodule=None)
            module.configure_model()
            strategy.model = wrapped = wrap_like_lightning(module, strategy)
            batch = _batch(module.student.config.vocab_size)
            _ForwardRedirection()(wrapped, module, "training_step", batch, 0).backward()

            state = module.gathered_student_state()
            exported_at = []  # when each export call returned
            module.export = _timed(module.export, exported_at)
            module.on_train_end()  # gathers again, rank 0 writes, every rank waits at the barrier
            record[stage] = {"exported_at": exported_at, "left_at": time.time()}
            torch.save(state, Path(out) / f"{stage}_state{rank}.pt")
        # the root cause, shown without the crash: the storage that rank 0's parameters point at inside the
        # unshard of a state-dict gather with and without offloading (the hooks read the values inside it)
        for offload in (False, True):
            with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, offload_to_cpu=offload,
                                                             rank0_only=offload):
                record[f"storage_bytes_offload_{offload}"] = [
                    p.untyped_storage().nbytes() for p in module.student.parameters()]
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(smol_teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp_export")
    spawn_ranks(_rank, (str(smol_teacher_dir), str(out)), out, WORLD, DEADLINE_S)
    return out


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("stage", ["align", "kd"])
def test_rank0_gathers_the_unsharded_state(stage, runs, smol_teacher_dir):
    """Rank 0 holds the plain student's full state dict (fp32 masters, not the bf16 compute copies),
    the other rank holds nothing."""
    plain = _module(stage, str(smol_teacher_dir))
    plain.configure_model()
    expected = plain.student.state_dict()
    got = torch.load(runs / f"{stage}_state0.pt")
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].device.type == "cpu" and got[name].dtype == value.dtype == torch.float32, name
        assert torch.equal(got[name], value), name
    assert torch.load(runs / f"{stage}_state1.pt") == {}


@pytest.mark.parametrize("stage", ["align", "kd"])
def test_only_rank0_exports_the_consolidated_weights(stage, runs, smol_teacher_dir, tmp_path):
    """The exported folder holds exactly what the plain student's save_pretrained writes; rank 0 wrote it,
    rank 1 did not, both left after the barrier, and no temporary folder is left over."""
    plain = _module(stage, str(smol_teacher_dir))
    plain.configure_model()
    plain.student.save_pretrained(tmp_path)
    expected = _safetensors(tmp_path)

    folder = runs / stage / "student"
    got = _safetensors(folder)
    assert set(got) == set(expected)  # tied lm_head dropped as by save_pretrained
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    config = json.loads((folder / "config.json").read_text())
    assert config["lineage"]["stage"] == type(plain).__name__
    assert (folder / "tokenizer_config.json").is_file()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["student"]

    ranks = [json.loads((runs / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [len(r[stage]["exported_at"]) for r in ranks] == [1, 0]
    # rank 1 left on_train_end only once rank 0's export had returned (the barrier)
    assert ranks[1][stage]["left_at"] >= ranks[0][stage]["exported_at"][0]


def test_torch_frees_the_parameters_it_offloads_on_cpu(runs):
    """The cause of the segfault, in torch: inside the unshard of a CPU-sharded FSDP1 module, rank 0's full
    parameters point at their gathered storage, except when offloading to CPU: then at storage of 0 bytes
    (``FlatParamHandle.to_cpu`` freed the gathered flat parameter that ``.to("cpu")`` had not copied), and
    the state-dict hook's clone of them reads freed memory."""
    rank0 = json.loads((runs / "rank0.json").read_text())
    kept, offloaded = rank0["storage_bytes_offload_False"], rank0["storage_bytes_offload_True"]
    assert all(n > 0 for n in kept)
    if all(n > 0 for n in offloaded):
        pytest.skip("this torch no longer frees the CPU offload (pytorch#188989 fixed): "
                    "gathered_student_state could offload on CPU too")
    assert all(n == 0 for n in offloaded), offloaded


@pytest.mark.parametrize("device, offloads", [("cuda", True), ("cpu", False)])
def test_gather_offloads_to_rank0_only_from_an_accelerator(device, offloads, monkeypatch):
    """The options the gather asks for: on GPUs, offloaded and kept on rank 0 (one CPU copy, as before);
    on CPU, not offloaded (the torch bug above). Either way the other ranks get an empty dict."""
    import torch.distributed.checkpoint.state_dict as dcp_state_dict
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_xdistill.modules import KDModule

    asked = []
    full = {"student.lm_head.weight": torch.ones(2), "other.weight": torch.zeros(1)}
    monkeypatch.setattr(dcp_state_dict, "get_model_state_dict",
                        lambda model, options: asked.append((model, options)) or full)
    strategy = FSDPStrategy()
    strategy.parallel_devices = [torch.device(device, 0) if device == "cuda" else torch.device("cpu")] * 2
    strategy.model = sentinel = torch.nn.Linear(1, 1)
    module = KDModule()
    for rank, expected in ((0, {"lm_head.weight": full["student.lm_head.weight"]}), (1, {})):
        module._trainer = SimpleNamespace(strategy=strategy, world_size=2, global_rank=rank,
                                          is_global_zero=rank == 0)
        got = module.gathered_student_state()
        assert got.keys() == expected.keys() and all(got[k] is v for k, v in expected.items())
    assert [m for m, _ in asked] == [sentinel, sentinel]
    assert all(o.full_state_dict and o.cpu_offload == offloads for _, o in asked)
