"""``lit-xdistill``: LightningCLI for the stages, plus plain subcommands around them.

    lit-xdistill fit --config configs/align.yaml                  # stage I
    lit-xdistill fit --config configs/kd.yaml                     # stage II
    lit-xdistill fit --config configs/kd.yaml --config configs/teachers/gemma3-270m.yaml
    lit-xdistill cache_logits '[configs/kd.yaml]' runs/kd/logits              # teacher top-k, once
    torchrun --nproc-per-node 4 -m lit_xdistill.cli cache_logits '[configs/kd.yaml]' runs/kd/logits  # on 4 GPUs
    lit-xdistill export '[configs/kd.yaml]' runs/kd/checkpoints/last.ckpt runs/kd/student
    lit-xdistill wintie TEACHER.json STUDENT.json --plot curve.png
    lit-xdistill evaluate runs/kd/student smollm2-135m-instruct --suite default
    lit-xdistill merge --paths '[a, b]' --weights '[0.5, 0.5]' --out_dir runs/merged

A run that seems stuck (one rank of a multi-GPU run waiting on another, say): ``kill -USR2 <pid>`` (or
``pkill -USR2 -f lit_xdistill``) prints every thread's Python stack to stderr and lets the run go on. (SIGUSR1
stays the pre-emption signal: SLURM requeue, ``PreemptionCheckpoint``.)
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from .data import DistillDataModule
from .modules import StudentModule

__all__ = ["XDistillCLI", "main"]


class XDistillCLI(LightningCLI):
    """LightningCLI with the stage modules as subclasses of ``StudentModule`` and our data module."""

    def __init__(self, args: list[str] | None = None, run: bool = True):
        super().__init__(
            model_class=StudentModule,
            subclass_mode_model=True,
            datamodule_class=DistillDataModule,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "default"},
                },
            },
            parser_kwargs={"default_env": False},
            args=args,
            run=run,
        )


    def before_instantiate_classes(self) -> None:
        """A logit cache must come from this run's teacher: pin its identity unless set explicitly."""
        from .teachers import TeacherSpec

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        data, teacher = cfg.get("data"), cfg.get("model.init_args.teacher")
        if data is None or teacher is None or not data.get("logit_cache") or data.get("logit_cache_teacher"):
            return
        data.logit_cache_teacher = TeacherSpec(**dict(teacher)).identity


def _build(configs: list[str]) -> XDistillCLI:
    args: list[str] = []
    for path in configs:
        args += ["--config", path]
    return XDistillCLI(args=args, run=False)


def cache_logits(configs: list[str], out_dir: str, k: int = 256, batch_size: int = 8, device: str = "auto",
                 split: str = "train") -> Path:
    """Run the teacher once over a stage's data and write its top-k next-token log-probs.

    On several GPUs (data parallel: each rank holds a whole teacher and computes every W-th shard; the cache is
    the same as from one process):

        torchrun --nproc-per-node 4 -m lit_xdistill.cli cache_logits '[configs/kd.yaml]' runs/kd/logits

    Args:
        configs: the stage config file(s) (as given to ``fit --config``): teacher and data are taken from them.
        out_dir: folder to write (``<out_dir>/<split>``); point ``data.logit_cache`` at ``out_dir``.
        k: teacher tokens kept per position.
        batch_size: blocks per teacher forward pass.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda`` (under torchrun ``auto`` and ``cuda`` mean
            ``cuda:<LOCAL_RANK>``).
        split: ``train`` or ``val``.
    """
    import os

    import torch
    import torch.distributed as dist

    from .data.logit_cache import write_topk_cache
    from .models import student_from_teacher

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()  # by torchrun
    if launched:
        if dev == "cuda":
            dev = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)  # NCCL's collectives run on the current device
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    try:
        cli = _build(configs)
        spec = cli.model.teacher_spec
        teacher = student_from_teacher(spec.load_model(), spec.identity, mixer="attention").to(dev).eval()
        return write_topk_cache(teacher, cli.datamodule, str(Path(out_dir) / split), k=k, batch_size=batch_size,
                                teacher_identity=spec.identity, device=dev, split=split)
    finally:
        if launched:
            dist.destroy_process_group()


def export(configs: list[str], ckpt_path: str, out_dir: str) -> Path:
    """Export the student of a Lightning checkpoint as a plain HF folder.

    Args:
        configs: the stage config file(s) the checkpoint was trained with.
        ckpt_path: the ``.ckpt`` file.
        out_dir: folder to write (weights, config, tokenizer).
    """
    cli = _build(configs)
    cli.model.student_options.init_from = ckpt_path
    cli.model.configure_model()
    path = cli.model.export(out_dir)
    print(f"[lit-xdistill] exported {ckpt_path} to {path}")
    return path


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-xdistill`` console script."""
    if hasattr(signal, "SIGUSR2"):  # POSIX: stack dump on demand; ranks started by Lightning come here too
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    argv = list(sys.argv[1:] if args is None else args)
    from .eval.commands import evaluate, wintie
    from .modules.experts import merge_experts
    from .modules.merge import merge_report

    extra = {"cache_logits": cache_logits, "export": export, "wintie": wintie, "evaluate": evaluate,
             "merge": merge_experts, "merge_report": merge_report}
    if argv and argv[0] in extra:
        from jsonargparse import auto_cli

        auto_cli(extra, args=argv)
        return
    XDistillCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
