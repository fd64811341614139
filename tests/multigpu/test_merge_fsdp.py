"""Stage III (learned merge coefficients) under FSDP, run for real on CPU with 2 gloo ranks, against the same
steps in one process.

The experts and the student that carries the merged weights stay out of the module tree, so FSDP shards only
the coefficient logits: each rank takes half of the global batch, FSDP averages the coefficient gradients, and
the coefficients must follow the single-process run on the whole batch. The wrap is configs/fsdp.yaml's
(``wrap_like_lightning``) with fp32 parameters instead of bf16, so that the comparison is exact up to the
reduction order; the bf16 policy itself is exercised by test_fsdp_export.py and test_alignment_fsdp_hooks.py.
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

WORLD, STEPS, B, S, K = 2, 3, 4, 24, 4
DEADLINE_S = 150


def _module(teacher_dir: str, experts: list[str], export_dir: str | None = None):
    from lit_xdistill.modules import MergeModule
    from lit_xdistill.teachers import TeacherSpec

    module = MergeModule(experts=experts, learn=True, lr=0.5, teacher=TeacherSpec(teacher_dir, dtype="float32"),
                         export_dir=export_dir)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    return module


def _global_batch(vocab: int) -> dict[str, torch.Tensor]:
    """B rows with the teacher's top-k given (no live teacher), every label supervised (so the mean over each
    rank's half, averaged over the ranks, is the mean over the whole batch)."""
    from lit_xdistill.models import document_positions

    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (B, S), generator=gen)
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * S, [0] * 5 + [1] * 19, [0] * S])
    return {"input_ids": ids, "segment_ids": segments, "position_ids": document_positions(segments),
            "labels": torch.randint(0, vocab, (B, S), generator=gen),
            "topk_ids": torch.randint(0, vocab, (B, S, K), generator=gen),
            "topk_logprobs": torch.randn(B, S, K, generator=gen).log_softmax(-1) - 1.0}


def _rank(rank: int, world: int, port: int, teacher_dir: str, experts: list[str], out: str) -> None:
    """One rank: the merge module under fsdp.yaml's strategy, STEPS optimizer steps on this rank's half of the
    global batch, then λ, the evaluation student and the end-of-fit export, as in a real run."""
    import faulthandler

    import torch.distributed as dist
    from lightning.pytorch.strategies.strategy import _ForwardRedirection
    from torch.distributed.fsdp import MixedPrecision

    fault = open(Path(out) / f"fault{rank}.txt", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.enable(fault)
    init_gloo(rank, world, port)
    try:
        strategy = cpu_fsdp_strategy(world)
        strategy.mixed_precision = MixedPrecision(torch.float32, torch.float32, torch.float32)
        module = _module(teacher_dir, experts, export_dir=str(Path(out) / "merged"))
        module._trainer = SimpleNamespace(strategy=strategy, world_size=world, global_rank=rank,
                                          is_global_zero=rank == 0, datamodule=None)
        module.configure_model()
        registered = [name for name, _ in module.named_parameters()]
        strategy.model = wrapped = wrap_like_lightning(module, strategy)
        optimizer = module.configure_optimizers()["optimizer"]  # built after the wrap, as Lightning does
        batch = _global_batch(module.student.config.vocab_size)
        mine = {k: v[rank::world] for k, v in batch.items()}
        for step in range(STEPS):
            _ForwardRedirection()(wrapped, module, "training_step", mine, step).backward()
            optimizer.step()
            optimizer.zero_grad()
        lam = module.full_coefficients()
        evaluated = module.evaluation_student()
        module.on_train_end()  # rank 0 streams the merge, every rank waits at the barrier
        record = {"registered": registered, "lambda": lam.tolist(), "left_at": time.time(),
                  "student_wrapped": any("FullyShardedDataParallel" in type(m).__name__
                                         for m in module.student.modules()),
                  "evaluated": evaluated is not None}
        if evaluated is not None:
            torch.save(evaluated.state_dict(), Path(out) / f"evaluated{rank}.pt")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        (Path(out) / f"error{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()


def _make_experts(teacher_dir: Path, root: Path) -> list[str]:
    """Two hybrid students converted from the teacher, each with its own Gaussian noise on every weight."""
    from transformers import LlamaForCausalLM

    from lit_xdistill.models import student_from_teacher
    from lit_xdistill.modules.base import StudentOptions
    from lit_xdistill.teachers import TeacherSpec

    spec = TeacherSpec(str(teacher_dir))
    paths = []
    for i in range(2):
        teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        student = student_from_teacher(teacher, spec.identity, **StudentOptions(window=8).mixer_options())
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        student.config.lineage = {"seed": "sha256:stage-one-student", "stage": "kd"}
        student.save_pretrained(root / f"expert{i}")
        spec.load_tokenizer().save_pretrained(root / f"expert{i}")
        paths.append(str(root / f"expert{i}"))
    return paths


@pytest.fixture(scope="module")
def run(smol_teacher_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("merge_fsdp")
    experts = _make_experts(smol_teacher_dir, tmp_path_factory.mktemp("experts"))
    spawn_ranks(_rank, (str(smol_teacher_dir), experts, str(out)), out, WORLD, DEADLINE_S)
    return out, experts


def _single_process_lambda(teacher_dir: Path, experts: list[str]) -> torch.Tensor:
    module = _module(str(teacher_dir), experts)
    module.configure_model()
    optimizer = module.configure_optimizers()["optimizer"]
    batch = _global_batch(module.student.config.vocab_size)
    for step in range(STEPS):
        module.training_step(batch, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return module.full_coefficients()


def test_fsdp_shards_only_the_coefficients_and_learns_what_one_process_learns(run, smol_teacher_dir):
    out, experts = run
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["registered"] for r in ranks] == [["merge_logits"]] * WORLD  # the student is not in the tree
    assert not any(r["student_wrapped"] for r in ranks)
    expected = _single_process_lambda(smol_teacher_dir, experts)
    assert not torch.allclose(expected, torch.full_like(expected, 0.5), atol=1e-3)  # the steps moved λ
    for r in ranks:  # every rank holds the whole λ, the same as one process on the whole batch
        torch.testing.assert_close(torch.tensor(r["lambda"]), expected, rtol=1e-5, atol=1e-6)


def test_rank0_streams_the_learned_merge_once_and_scores_it(run):
    from safetensors.torch import load_file

    out, experts = run
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    lam = torch.tensor(ranks[0]["lambda"])[0]
    record = json.loads((out / "merged" / "merge_coefficients.json").read_text())
    torch.testing.assert_close(torch.tensor(record["lambda"]["all"], dtype=torch.float32), lam)
    a, b = (load_file(Path(e) / "model.safetensors") for e in experts)
    merged = load_file(out / "merged" / "model.safetensors")
    assert set(merged) == set(a)
    for name in merged:
        torch.testing.assert_close(merged[name], lam[0] * a[name] + lam[1] * b[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["merged"]  # no temporary folder left
    # the Win-and-Tie callback scores the merge with the current λ (on rank 0 only), not expert 0
    assert [r["evaluated"] for r in ranks] == [True, False]
    evaluated = torch.load(out / "evaluated0.pt")
    compared = [name for name in merged if name in evaluated]
    assert len(compared) == len(merged)  # the saved names are the model's own
    for name in compared:
        torch.testing.assert_close(evaluated[name], merged[name], rtol=1e-5, atol=1e-6)
    # rank 1 left on_train_end only after rank 0 had written the merge (the barrier)
    assert ranks[1]["left_at"] >= (out / "merged" / "model.safetensors").stat().st_mtime
