"""Reliability for long runs: non-finite steps, pre-emption signals, atomic and verified checkpoints.

What Lightning already does and we rely on (see ``docs/reliability.md``):

* SIGTERM: Lightning's signal connector sets ``trainer.received_sigterm``; the loops raise
  ``SIGTERMException`` (a ``SystemExit``, exit status 0) after the current batch has finished, and the
  ``on_exception`` hooks run. :class:`PreemptionCheckpoint` makes sure a checkpoint of that state exists.
* SLURM: ``SLURMEnvironment(auto_requeue=True)`` saves ``hpc_ckpt_*.ckpt`` and requeues on its requeue
  signal; used as is when running under SLURM.
* Resume: ``--ckpt_path last`` restores model, optimizer, scheduler, loop and data-loader state.

What this module adds: :class:`NonFiniteGuard` (skip or stop on NaN/Inf), :class:`PreemptionCheckpoint`
(other signals such as SIGUSR1 behave like SIGTERM; a checkpoint is always written on that exit) and
:class:`AtomicCheckpointIO` (checkpoints written beside their target and renamed, truncated files
refused with the fix named).
"""

from __future__ import annotations

import os
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "NonFiniteError",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
]


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient and the run was stopped (a checkpoint was saved)."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated or not a checkpoint at all."""


def _first_nonfinite(named: list[tuple[str, torch.Tensor | None]]) -> str | None:
    """Name of the first tensor (in module order) holding a NaN or Inf."""
    for name, tensor in named:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class NonFiniteGuard(L.Callback):
    """Detects a NaN/Inf loss or gradient before the optimizer step and skips the step or stops the run.

    A bad step never reaches the weights: its gradients are dropped (``set_to_none``), so the optimizer
    leaves every parameter and its moments untouched (the LR scheduler and ``global_step`` still advance).

    Args:
        action: ``skip``: drop the step, count it (logged as ``train/skipped_steps``) and go on;
            ``stop``: drop the step, save a checkpoint ``nonfinite-step=<N>.ckpt`` (the weights before the
            bad step) and raise :class:`NonFiniteError` naming the step, the first parameter whose
            gradient is non-finite and the first module whose output is non-finite on that batch.
        check_grads: also check gradients (a finite loss can still give Inf gradients); costs one
            reduction per parameter per step.
        max_consecutive_skips: in ``skip`` mode, stop (as in ``stop`` mode) after this many bad steps in
            a row: a diverged run is not silently skipped to the end.
        dirpath: folder of the ``stop`` checkpoint; default: the ModelCheckpoint folder, else the log dir.
    """

    def __init__(
        self,
        action: Literal["skip", "stop"] = "skip",
        check_grads: bool = True,
        max_consecutive_skips: int = 10,
        dirpath: str | None = None,
    ) -> None:
        if action not in ("skip", "stop"):
            raise ValueError(f"NonFiniteGuard.action must be 'skip' or 'stop', got {action!r}.")
        self.action, self.check_grads = action, check_grads
        self.max_consecutive_skips, self.dirpath = max_consecutive_skips, dirpath
        self.skipped_steps = 0
        self._consecutive = 0
        self._bad_loss = False
        self._problem: str | None = None  # description of the bad step, set before the optimizer step

    # -- detection ------------------------------------------------------------------------------
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad_grad = None
        if self.check_grads:
            bad_grad = _first_nonfinite([(n, p.grad) for n, p in pl_module.named_parameters()])
        if self._bad_loss or bad_grad:
            what = "loss is non-finite" if self._bad_loss else "loss is finite"
            self._problem = f"{what}; first parameter with a non-finite gradient: {bad_grad or 'none'}"
            optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        self._bad_loss = False

    # -- reaction -------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        problem, self._problem = self._problem, None
        if problem is None:
            self._consecutive = 0
        else:
            self.skipped_steps += 1
            self._consecutive += 1
            where = f"step {trainer.global_step - 1} (epoch {trainer.current_epoch}, batch {batch_idx})"
            if self.action == "stop" or self._consecutive > self.max_consecutive_skips:
                self._stop(trainer, pl_module, batch, batch_idx, f"Non-finite values at {where}: {problem}")
            rank_zero_warn(f"NonFiniteGuard: skipped {where}: {problem}.")
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def _stop(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, message: str
    ) -> None:
        module = self._first_nonfinite_module(pl_module, batch, batch_idx)
        path = Path(self._checkpoint_dir(trainer)) / f"nonfinite-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)
        raise NonFiniteError(
            f"{message}; first module with a non-finite output on this batch: {module or 'none (the loss)'}. "
            f"Saved the weights before this step to {path}. Lower the learning rate, check this batch's "
            "data, or use NonFiniteGuard(action='skip'); resume with --ckpt_path on that checkpoint."
        )

    def _checkpoint_dir(self, trainer: L.Trainer) -> str:
        if self.dirpath:
            return self.dirpath
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return str(callback.dirpath)
        return trainer.log_dir or trainer.default_root_dir

    @staticmethod
    def _first_nonfinite_module(pl_module: L.LightningModule, batch: Any, batch_idx: int) -> str | None:
        """Replay the batch's forward with hooks and name the first module whose output is non-finite."""
        found: list[str] = []

        def hook(name: str):
            def check(_module: torch.nn.Module, _args: Any, output: Any) -> None:
                tensor = getattr(output, "logits", output[0] if isinstance(output, tuple) else output)
                if (
                    not found
                    and isinstance(tensor, torch.Tensor)
                    and tensor.is_floating_point()
                    and not bool(torch.isfinite(tensor).all())
                ):
                    found.append(name)

            return check

        handles = [m.register_forward_hook(hook(n)) for n, m in pl_module.named_modules() if n]
        try:
            with torch.no_grad():
                pl_module.training_step(batch, batch_idx)
        finally:
            for handle in handles:
                handle.remove()
        return found[0] if found else None

    # -- checkpointed state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]


class PreemptionCheckpoint(L.Callback):
    """Pre-emption (SIGTERM, SIGUSR1, ...) ends the run cleanly after the current step, with a checkpoint.

    Lightning already turns SIGTERM into a clean exit (``SIGTERMException``, exit status 0) after the
    running batch. This callback (1) makes the listed extra signals do the same, by passing them to the
    SIGTERM handler Lightning installs, and (2) when that exit happens, makes every ``ModelCheckpoint``
    write its checkpoint (and ``last.ckpt``) for the current step if it has not yet, so that
    ``--ckpt_path last`` resumes at exactly that step.

    Under SLURM with Lightning's auto-requeue the requeue signal keeps Lightning's own handler (it saves
    an ``hpc_ckpt`` and requeues); list it here only with ``SLURMEnvironment(auto_requeue=False)``.

    Args:
        signals: extra signal names treated like SIGTERM (SLURM: ``#SBATCH --signal=B:USR1@120``).
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        names = ["SIGUSR1"] if signals is None else signals
        unknown = [name for name in names if not hasattr(signal, name)]
        if unknown:
            raise ValueError(
                f"PreemptionCheckpoint: unknown signal names {unknown}; use e.g. SIGUSR1, SIGUSR2."
            )
        self.signals = [getattr(signal, name) for name in names]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after on_fit_start and restores all handlers at teardown.
        sigterm_handler = signal.getsignal(signal.SIGTERM)
        if not callable(sigterm_handler):
            return
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if callable(previous):  # e.g. Lightning's SLURM requeue handler: keep it
                continue

            def forward(received: int, frame: Any) -> None:
                rank_zero_info(f"Received {signal.Signals(received).name}: checkpointing after this step.")
                sigterm_handler(signal.SIGTERM, frame)

            signal.signal(signum, forward)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and not callback.save_on_exception:
                # ModelCheckpoint's own on_exception saves the step and last.ckpt (unless this step is
                # already saved); enable it just for this call.
                callback.save_on_exception = True
                try:
                    callback.on_exception(trainer, pl_module, exception)
                finally:
                    callback.save_on_exception = False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` checkpoints written atomically in place, and read back with a clear error if damaged.

    Lightning's default writes through an fsspec transaction whose temporary file lives in the system
    temp folder and is then *moved*; across file systems (local ``/tmp``, checkpoints on NFS/Lustre) that
    move is a copy, so a kill during it leaves a truncated checkpoint under the final name. Here the
    temporary file sits beside the target (``.<name>.tmp-*``), is fsync'ed, then ``os.replace``'d.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` via a temporary file in the same folder and an atomic rename."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint does not take storage_options.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load ``path``; refuse a truncated or foreign file with :class:`CorruptCheckpointError`."""
        file = Path(path)
        if file.is_file() and not zipfile.is_zipfile(file):
            siblings = sorted(p.name for p in file.parent.glob("*.ckpt") if p != file)
            raise CorruptCheckpointError(
                f"Checkpoint {file} is truncated or corrupted ({file.stat().st_size} bytes, no zip "
                "directory). "
                f"Resume from another checkpoint with --ckpt_path <file> (in that folder: "
                f"{', '.join(siblings) or 'none'}), or start without --ckpt_path."
            )
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
