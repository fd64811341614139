"""Shared pieces of the multi-GPU tests: the shipped configs, a CLI that stops before the Trainer exists,
a tiny random teacher folder with the real SmolLM2 tokenizer, a few text documents, a probe callback
that records, per rank, what a distributed run did, and the pieces that run a stage under real FSDP1 on CPU
ranks (gloo)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
CONFIGS = REPO / "configs"
FSDP_YAML = CONFIGS / "fsdp.yaml"
STAGES = sorted(p for p in CONFIGS.glob("*.yaml") if (yaml.safe_load(p.read_text()) or {}).get("model"))
TEACHERS = sorted((CONFIGS / "teachers").glob("*.yaml"))


def build_strategy_cli(*configs: Path):
    """``XDistillCLI`` on ``configs`` that instantiates every class (strategy, model, data) but no Trainer.

    Lightning refuses FSDP on a CPU accelerator when the Trainer is built, so the trainer's keyword
    arguments, with the strategy already instantiated by jsonargparse exactly as in a real run, are kept
    in ``cli.trainer_init`` instead.
    """
    from lit_xdistill.cli import XDistillCLI

    class StrategyProbeCLI(XDistillCLI):
        def instantiate_trainer(self, **kwargs: Any) -> None:
            self.trainer_init = {**self._get(self.config_init, "trainer", default={}), **kwargs}

    args: list[str] = []
    for path in configs:
        args += ["--config", str(path)]
    return StrategyProbeCLI(args=args, run=False)


# -- real FSDP1 on CPU ranks (gloo): how test_alignment_fsdp_hooks.py and test_fsdp_export.py wrap a stage -----


def free_port() -> int:
    """A TCP port free on this host now, for a spawned process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group; a collective that only some ranks join times out after 60 s."""
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def spawn_ranks(rank_fn, args: tuple, out: Path, world: int = 2, deadline_s: float = 150) -> None:
    """Run ``rank_fn(rank, world, port, *args)`` in ``world`` spawned processes joined by gloo at ``port``.

    Fails the test on a crash, past ``deadline_s`` (a rank waiting in a collective the others left), or when a
    rank left an ``error<rank>.txt`` in ``out``, showing what the ranks wrote there (error files, fault stacks).
    """
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(rank_fn, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} ranks did not finish within {deadline_s} s")
    except Exception as exc:
        for p in context.processes:
            if p.is_alive():
                p.kill()
        reports = [f"--- {f.name}\n{f.read_text()}" for f in sorted(out.glob("*.txt")) if f.read_text()]
        pytest.fail(f"{type(exc).__name__}: {exc}\n" + "\n".join(reports))
    errors = sorted(out.glob("error*.txt"))
    assert not errors, errors[0].read_text()


def cpu_fsdp_strategy(world: int):
    """configs/fsdp.yaml's FSDPStrategy (composed with align.yaml), made to serve ``world`` CPU ranks.

    Only ``sync_module_states`` is off: FSDP refuses it for CPU tensors, and every rank converts the teacher
    itself (deterministic, so the replicas are identical all the same)."""
    align_yaml = next(p for p in STAGES if p.name == "align.yaml")
    strategy = build_strategy_cli(align_yaml, FSDP_YAML).trainer_init["strategy"]
    strategy.kwargs["sync_module_states"] = False
    strategy.parallel_devices = [torch.device("cpu")] * world  # root_device (set by a Trainer in a real run)
    return strategy


def wrap_like_lightning(module: L.LightningModule, strategy):
    """``module`` wrapped as lightning 2.6 ``FSDPStrategy._setup_model`` wraps it, on CPU: one root FSDP unit
    with the strategy's policies, then activation checkpointing inside each unit."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(
        module=module, cpu_offload=strategy.cpu_offload, mixed_precision=strategy.mixed_precision_config,
        sharding_strategy=strategy.sharding_strategy, device_id=torch.device("cpu"), **strategy.kwargs)
    _setup_activation_checkpointing(wrapped, strategy._activation_checkpointing_kwargs)
    return wrapped


@pytest.fixture(scope="session")
def smol_teacher_dir(tmp_path_factory) -> Path:
    """A tiny random ``LlamaForCausalLM`` (2 layers, hidden 64) saved with the real SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_xdistill.teachers import TeacherSpec

    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = TeacherSpec("smollm2-135m-instruct").load_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory) -> Path:
    """24 short .txt documents: enough for a few 32-token blocks per rank."""
    folder = tmp_path_factory.mktemp("docs")
    words = "the cat sat on a mat while dogs ran over hills and rivers under bright stars".split()
    for i in range(24):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(40 + 7 * i)))
    return folder


class RankProbe(L.Callback):
    """Records per rank, into ``<out_dir>/rank<global_rank>.json`` at the end of ``fit``: the world size,
    how often this rank ran an lm-eval suite and exported the student, and the ``wintie/*`` metrics it
    logged. Counting wraps ``lit_xdistill.eval.harness.run_suite`` and the module's ``export`` in this
    process; their behaviour is unchanged.

    Args:
        out_dir: Folder for the per-rank JSON files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.calls = {"run_suite": 0, "export": 0}

    def _counting(self, name: str, fn):
        def wrapper(*args: Any, **kwargs: Any):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Wrap the two functions whose calls are counted (in this rank's process only)."""
        from lit_xdistill.eval import harness

        harness.run_suite = self._counting("run_suite", harness.run_suite)
        pl_module.export = self._counting("export", pl_module.export)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write this rank's record (after the module's ``on_train_end`` export and its barrier)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "calls": self.calls,
            "wintie": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("wintie/")},
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
