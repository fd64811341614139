"""``WinTieCallback``: evaluate the student against its teacher during training and log Win-and-Tie.

What it needs from the LightningModule: ``student`` (a causal LM), ``tokenizer`` and ``teacher_spec``
(a ``TeacherSpec``; not needed when ``teacher_results`` names a results file). The stage modules also give
``evaluation_student()``, which the callback scores instead of ``student`` (see below, and the merge stage,
whose student carries the merged weights only inside its forward).

Distributed runs: the evaluation runs on global rank 0 only; the other ranks wait in the broadcast
that hands rank 0's metrics to every rank, so all ranks log the same values. Under DDP the process
group's timeout (Lightning's default: 30 min) must exceed one evaluation: keep ``limit`` small or raise
the strategy's ``timeout``. Under FSDP (``FSDPStrategy`` or ``ModelParallelStrategy``) the student is
sharded: every rank first takes part in ``StudentModule.evaluation_student()``, which gathers the
full state dict (also with sharded checkpoints) onto rank 0, CPU-offloaded, and rank 0 evaluates an
unsharded copy of the student built from its config; this needs CPU memory for one full copy on rank 0.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from lit_xdistill.eval.wintie import DEFAULT_ALPHAS


class WinTieCallback(L.Callback):
    """Every n-th epoch (or n-th step), score the student on a suite and log Win-and-Tie vs the teacher.

    Logs ``wintie/C_0``, ``wintie/C_0.05``, ``wintie/alpha_star`` (``nan`` while C_α < 0.5 on the whole
    grid), ``wintie/recovery/<task>`` and ``wintie/score/<task>`` (the student's score) through
    ``pl_module.log`` (so ``ModelCheckpoint(monitor="wintie/C_0")`` works), and the C_α curve as the
    figure ``wintie/curve`` to every TensorBoard logger. Teacher scores are computed once per teacher +
    suite + limit and cached on disk (or read from ``teacher_results``).

    Args:
        suite: Suite YAML path or name under configs/eval (default ``quick``: 5 tasks, 0-shot, 50 items).
        every_n_epochs: Evaluate at the end of every n-th training epoch (0 disables the epoch trigger).
        every_n_train_steps: Also evaluate every n optimizer steps (for step-budgeted runs); 0 disables.
        limit: Items per task; default the suite's limit; 0 for the full sets.
        batch_size: Requests per forward pass during evaluation.
        teacher_results: An lm-eval results JSON of the teacher on the same suite, instead of computing it.
        cache_dir: Cache root for rendered tasks and teacher results; default ``~/.cache/lit_xdistill``.
        alphas: Tolerance grid for C_α and α*; default 0.00, 0.01, ..., 0.50.
    """

    def __init__(
        self,
        suite: str = "quick",
        every_n_epochs: int = 1,
        every_n_train_steps: int = 0,
        limit: int | None = None,
        batch_size: int = 8,
        teacher_results: str | None = None,
        cache_dir: str | None = None,
        alphas: list[float] | None = None,
    ) -> None:
        from lit_xdistill.eval.tasks import load_suite

        self.suite = load_suite(suite)  # fail at construction on a bad suite file
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.limit, self.batch_size = limit, batch_size
        self.teacher_results, self.cache_dir = teacher_results, cache_dir
        self.alphas = tuple(alphas) if alphas else DEFAULT_ALPHAS
        self._teacher_json: dict[str, Any] | None = None
        self._last_step = -1

    # -- triggers ---------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate at the end of every ``every_n_epochs``-th epoch."""
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Evaluate every ``every_n_train_steps`` optimizer steps."""
        step = trainer.global_step
        if self.every_n_train_steps and step and step % self.every_n_train_steps == 0:
            if self._last_step != step:  # with gradient accumulation a step spans several batches
                self._last_step = step
                self.evaluate(trainer, pl_module)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Run one evaluation (all ranks must call it) and log its metrics; returns them."""
        student = self._unsharded_student(trainer, pl_module)
        metrics, report = None, None
        if trainer.is_global_zero:
            metrics, report = self._score(pl_module, student)
        metrics = trainer.strategy.broadcast(metrics, src=0)
        for name, value in metrics.items():
            pl_module.log(name, value, sync_dist=False)
        if report is not None:
            self._log_figure(trainer, report)
        return metrics

    def _unsharded_student(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.nn.Module | None:
        """The student to evaluate on rank 0 (``None`` elsewhere): the stage's ``evaluation_student()`` (a
        collective: it gathers FSDP shards; the merge stage applies its learned coefficients), else
        ``pl_module.student``."""
        if hasattr(pl_module, "evaluation_student"):
            return pl_module.evaluation_student()
        return pl_module.student if trainer.is_global_zero else None

    def _teacher(self, pl_module: L.LightningModule) -> dict[str, Any]:
        from lit_xdistill.eval.harness import teacher_results
        from lit_xdistill.eval.report import load_results

        if self._teacher_json is None:
            if self.teacher_results:
                self._teacher_json = load_results(self.teacher_results)
            else:
                self._teacher_json = teacher_results(
                    pl_module.teacher_spec,
                    self.suite,
                    self.limit,
                    self.batch_size,
                    pl_module.device,
                    self.cache_dir,
                )
        return self._teacher_json

    def _score(self, pl_module: L.LightningModule, student: torch.nn.Module) -> tuple[dict[str, float], Any]:
        from lit_xdistill.eval.commands import compare_results
        from lit_xdistill.eval.harness import run_suite

        teacher_json = self._teacher(pl_module)
        was_training = student.training
        try:
            student_json = run_suite(
                student,
                pl_module.tokenizer,
                self.suite,
                self.limit,
                self.batch_size,
                self.cache_dir,
                bootstrap_iters=0,
            )
        finally:
            student.train(was_training)
        report = compare_results(teacher_json, student_json, self.alphas, suite=self.suite)
        metrics = {
            "wintie/C_0": report.coverage_at(0.0),
            "wintie/C_0.05": report.coverage_at(0.05),
            "wintie/alpha_star": report.alpha_star,
        }
        for task in report.tasks:
            metrics[f"wintie/recovery/{task.task}"] = task.recovery
            metrics[f"wintie/score/{task.task}"] = task.student
        return {k: float(v) for k, v in metrics.items()}, report

    def _log_figure(self, trainer: L.Trainer, report: Any) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from lit_xdistill.eval.report import coverage_figure

        star = "none" if math.isnan(report.alpha_star) else f"{report.alpha_star:.2f}"
        title = f"Win-and-Tie, step {trainer.global_step} (α* = {star})"
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                figure = coverage_figure({"student": report}, title=title)
                logger.experiment.add_figure("wintie/curve", figure, global_step=trainer.global_step)
