"""What every stage shares: building or loading the student, optimiser schedule, logging, export."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from ..models import XDistillConfig, XDistillForCausalLM, student_from_teacher, uninitialised_student
from ..teachers import TeacherSpec

__all__ = ["StudentOptions", "StudentModule", "StageHandoffError", "load_student"]


_say = rank_zero_only(print)  # works with or without a Trainer attached


class StageHandoffError(ValueError):
    """A previous stage's result does not fit this run (other teacher, other architecture)."""


@dataclass
class StudentOptions:
    """How the student is obtained.

    Args:
        init_from: a previous stage's result: an exported student folder (``config.json`` +
            safetensors) or a Lightning ``.ckpt``. None: convert the teacher afresh.
        mixer: mixer kind for every layer (``hybrid``, ``mlstm``, ``swa``, ``linear``, ``attention``)
            or a list with one kind per layer.
        window: sliding-window size of the attention branch.
        n_sinks: number of attention-sink tokens per document.
        feature_map: ``softmax_pm`` or ``softmax``.
        mlstm_backend: ``auto``, ``triton``, ``chunkwise``, ``parallel`` or ``recurrent``.
        attention_backend: ``auto``, ``flex`` or ``sdpa``.
        pointwise_backend: the mixer's feature maps, gate activations and output mix: ``auto`` (fused Triton
            kernels on CUDA, torch otherwise), ``triton`` or ``torch``.
        gradient_checkpointing: recompute decoder blocks in the backward pass to save memory.
        compile_blocks: ``torch.compile`` every decoder block in place (inductor; the blocks share one
            compilation). Eager, stage II on an H100 is host-bound (the GPU ~40 % busy, ~28k aten ops per step);
            compiling fuses the torch glue around our kernels into fewer launches: KD with cached logits went from
            0.52x to 0.66x of plain fine-tuning's tokens/s, live teacher 0.40x -> 0.56x, peak memory 25.2 -> 19.9
            GiB (docs/benchmarks.md). The first steps pay the compilation. ``auto``: on when the
            student trains on a CUDA device outside FSDP (not measured with FSDP's flat parameters; CPU runs are
            short and would spend their time compiling); ``true``/``false`` force it.
    """

    init_from: str | None = None
    mixer: str | list[str] = "hybrid"
    window: int = 512
    n_sinks: int = 4
    feature_map: str = "softmax_pm"
    mlstm_backend: str = "auto"
    attention_backend: str = "auto"
    pointwise_backend: str = "auto"
    gradient_checkpointing: bool = False
    compile_blocks: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        # A dotted override inside a subclass's init_args (`--model.init_args.student.init_from null`)
        # reaches us from jsonargparse as the string "None", not None: read it as "convert afresh".
        if self.init_from in ("None", "null", ""):
            self.init_from = None

    def backends(self) -> dict[str, str]:
        """The execution choices (``*_backend``): not architecture, so always this run's own."""
        return {k: v for k, v in self.mixer_options().items() if k.endswith("_backend")}

    def mixer_options(self) -> dict:
        opts = asdict(self)
        for key in ("init_from", "gradient_checkpointing", "compile_blocks"):
            opts.pop(key)
        return opts


def load_student(source: str, teacher: TeacherSpec, options: StudentOptions) -> XDistillForCausalLM:
    """Load a previous stage's student and check it was distilled from ``teacher``."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"init_from={source}: no config.json (expected an exported student folder)")
        student = XDistillForCausalLM.from_pretrained(path, dtype=torch.float32)
        _record_seed(student, sorted(path.glob("*.safetensors")), path)
    elif path.suffix == ".ckpt" and path.is_file():
        student = student_from_teacher(teacher.load_model(), teacher.identity, **options.mixer_options()).float()
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        missing, unexpected = student.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise StageHandoffError(
                f"init_from={source}: checkpoint does not match the student architecture "
                f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...); use the same student options "
                "(mixer, window, feature_map) as the run that wrote it."
            )
        _record_seed(student, [path], path)
    else:
        raise FileNotFoundError(f"init_from={source}: not an exported student folder nor a .ckpt file")
    found = student.config.teacher_identity
    if found != teacher.identity:
        raise StageHandoffError(
            f"init_from={source} was distilled from teacher {found!r}, but this run's teacher is "
            f"{teacher.identity!r}. Point init_from at a result of the same teacher, or change model.teacher."
        )
    _check_architecture(student, options, source)
    return student


def empty_student(source: str | None, teacher: TeacherSpec, options: StudentOptions,
                  dtype: torch.dtype = torch.float32) -> XDistillForCausalLM:
    """The student ``load_student``/``student_from_teacher`` would build, with uninitialised weights.

    For FSDP ranks other than 0 (``sync_module_states``): FSDP broadcasts rank 0's parameters *and buffers*
    (RoPE's non-persistent ``inv_freq`` included) over these in module order, so the module tree, names, shapes,
    dtypes and weight tying must equal rank 0's exactly; only the config is read from disk. Built on the meta
    device, then given CPU storage that nothing writes (the OS maps no pages for it, so it costs no resident
    memory until FSDP's copy) and re-tied: materialising a meta module unties shared weights (a tied
    lm_head would become a parameter of its own and shift every broadcast pair after it), which is why this is
    not left to FSDP's own meta-device materialisation. ``dtype`` applies to the parameters only: buffers keep
    the dtype they are built with, as ``student_from_teacher`` keeps the teacher's fp32 RoPE buffers.
    """
    path = Path(source).expanduser() if source else None
    if path is not None and path.is_dir():
        config = XDistillConfig.from_pretrained(path)
        for name, value in options.backends().items():
            setattr(config, name, value)
    else:  # a fresh conversion, or a Lightning .ckpt of one (same options, same config)
        config = XDistillConfig(teacher_config=teacher.load_config().to_dict(), teacher_identity=teacher.identity,
                                **options.mixer_options())
    return uninitialised_student(config, "cpu", dtype)


def _check_architecture(student: XDistillForCausalLM, options: StudentOptions, source: str) -> None:
    """The run's student options must describe the architecture of the student it continues."""
    wanted = {k: v for k, v in options.mixer_options().items() if not k.endswith("_backend")}
    have = {k: getattr(student.config, k) for k in wanted}
    diff = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
    if diff:
        detail = ", ".join(f"{k}: result has {a!r}, this run asks for {b!r}" for k, (a, b) in diff.items())
        raise StageHandoffError(
            f"init_from={source} has another student architecture ({detail}). Set model.student to the "
            "stage-I settings, or redo stage I with the new ones."
        )
    for owner in (student.config, *student.mixers()):
        for name, value in options.backends().items():
            setattr(owner, name, value)


def _record_seed(student: XDistillForCausalLM, files: list[Path], source: Path) -> None:
    """Remember which stage-I result a run started from (merging requires one shared seed)."""
    lineage = student.config.lineage
    if not lineage.get("seed"):
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        lineage["seed"] = "sha256:" + digest.hexdigest()
    lineage["init_from"] = str(source)


def warmup_then(step: int, warmup: int, total: int, decay: str, final_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then constant or cosine to ``final_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StudentModule(L.LightningModule):
    """Base of the stage modules: owns ``self.student`` (an ``XDistillForCausalLM``).

    Args:
        teacher: the teacher to distill (built-in name, folder, GGUF file or hub name).
        student: how to build or where to load the student.
        lr: peak learning rate.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        export_dir: write the trained student as a plain HF folder here at the end of ``fit``.
    """

    lr_decay = "constant"
    final_lr_ratio = 1.0

    def __init__(self, teacher: TeacherSpec | None = None, student: StudentOptions | None = None, lr: float = 1e-3,
                 warmup_steps: int = 10, weight_decay: float = 0.0, export_dir: str | None = None):
        super().__init__()
        self.teacher_spec = teacher or TeacherSpec()
        self.student_options = student or StudentOptions()
        self.lr, self.warmup_steps, self.weight_decay = lr, warmup_steps, weight_decay
        self.export_dir = export_dir
        self.student: XDistillForCausalLM | None = None
        self._tokenizer = None
        self._step_clock: float | None = None
        self.save_hyperparameters()

    # -- model ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the student once (Lightning calls this before restoring checkpoints, also under FSDP)."""
        if self.student is not None:
            return
        opts = self.student_options
        started = time.perf_counter()
        if self._rank_zero_builds_alone():
            student = empty_student(opts.init_from, self.teacher_spec, opts)
        elif opts.init_from:
            student = load_student(opts.init_from, self.teacher_spec, opts)
            _say(f"[lit-xdistill] student loaded from {opts.init_from}")
        else:
            teacher = self.teacher_spec.load_model()
            student = student_from_teacher(teacher, self.teacher_spec.identity, **opts.mixer_options()).float()
            _say("[lit-xdistill] no stage-I result given (student.init_from): starting from a freshly "
                 "converted student")
        if opts.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        if self._compiles_blocks():
            student.compile_blocks()
        # from_pretrained (a stage-I result) hands back eval mode, and Lightning keeps the modes it finds: a
        # training stage wants train mode (transformers' gradient checkpointing, for one, only runs in it).
        # A stage that wants otherwise says so in select_trainable (alignment keeps its frozen backbone in eval).
        student.train()
        self.student = student
        self.select_trainable()
        # start-up of a large run is otherwise silent until the first step (an 8B student takes a while)
        _say(f"[lit-xdistill] student built in {time.perf_counter() - started:.1f} s "
             f"({sum(p.numel() for p in student.parameters()) / 1e9:.2f}B parameters)")

    def _compiles_blocks(self) -> bool:
        """``student.compile_blocks`` resolved for this run (``auto``: CUDA and no FSDP; see StudentOptions)."""
        choice = self.student_options.compile_blocks
        if choice != "auto":
            return bool(choice)
        strategy = getattr(self._trainer, "strategy", None)
        if strategy is None or isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            return False
        return strategy.root_device.type == "cuda"

    def _fsdp_strategy(self) -> FSDPStrategy | None:
        """The run's FSDPStrategy when it spans several processes, else None."""
        trainer = self._trainer
        strategy = getattr(trainer, "strategy", None)
        if isinstance(strategy, FSDPStrategy) and trainer.world_size > 1:
            return strategy
        return None

    def _rank_zero_builds_alone(self) -> bool:
        """True on FSDP ranks other than 0 when FSDP broadcasts rank 0's weights (``sync_module_states``).

        Only rank 0 then reads the teacher (an 8B teacher is ~32 GB of CPU RAM in fp32 per process); the other
        ranks build the student on the meta device (``empty_student``) and FSDP fills it at wrap time.
        """
        strategy = self._fsdp_strategy()
        if strategy is None or self._trainer.global_rank == 0:
            return False
        return bool(strategy.kwargs.get("sync_module_states"))

    def select_trainable(self) -> None:
        """Set ``requires_grad`` on the parameters this stage trains (all by default)."""
        self.student.requires_grad_(True)

    @property
    def tokenizer(self):
        """The teacher's tokenizer (the student shares it)."""
        if self._tokenizer is None:
            self._tokenizer = self.teacher_spec.load_tokenizer()
        return self._tokenizer

    def student_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "segment_ids", "position_ids")}

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms are not decayed
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.95),
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = partial(warmup_then, warmup=max(1, self.warmup_steps), total=total, decay=self.lr_decay,
                           final_ratio=self.final_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- logging ----------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the global norm; under FSDP through the root module, whose norm spans all shards
        (Lightning's FSDP precision plugin refuses norm clipping itself)."""
        model = self.trainer.strategy.model
        by_norm = gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(model, FullyShardedDataParallel):
            model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.detach().float().norm() for p in self.student.parameters() if p.grad is not None]
        sharded = isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy)
        if not norms and not sharded:
            return
        # Sharded, a rank can hold no gradient at all (stage I's and train_params=mixer's few trainable
        # parameters may all lie in other ranks' shards) and must still join the reduce, a collective.
        device = self.trainer.strategy.root_device
        squared = torch.stack(norms).square().sum() if norms else torch.zeros((), device=device)
        if sharded:
            squared = self.trainer.strategy.reduce(squared, reduce_op="sum")  # shards -> global norm
        self.log("train/grad_norm", squared.sqrt(), on_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._step_clock is not None:
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._step_clock), on_step=True)
        self._step_clock = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        if torch.cuda.is_available():
            self.log("train/gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30, on_step=True)

    # -- export -----------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, state: dict[str, Tensor] | None = None) -> Path:
        """Write the student (weights, config, tokenizer) as a plain HF folder, atomically.

        Args:
            path: the folder to write (replaced if it exists).
            state: the full student state dict gathered from FSDP shards (a sharded module cannot be
                saved); None saves ``self.student`` as it is.
        """
        student = self.student
        if state is not None:  # built without random initialisation (minutes of CPU at 8B), then filled
            student = uninitialised_student(student.config, "cpu")
            student.load_state_dict(state)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        data = getattr(datamodule, "source_specs", None)
        student.config.lineage.update(stage=type(self).__name__, teacher=self.teacher_spec.identity,
                                      data=list(data or []))
        try:
            student.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            # never a moment without a complete folder at `target`: old -> backup, new -> target
            backup = target.with_name(target.name + ".old")
            if target.exists():
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def on_train_end(self) -> None:
        if not self.export_dir:
            return
        state = self.gathered_student_state()  # collective under FSDP: every rank takes part
        if self.trainer.is_global_zero:
            path = self.export(self.export_dir, state)
            _say(f"[lit-xdistill] student exported to {path}")
        self.trainer.strategy.barrier("export")

    def evaluation_student(self) -> torch.nn.Module | None:
        """The student to score (``WinTieCallback``), whole, on global rank 0; None on the other ranks.

        Collective under FSDP (every rank must call it): the shards are gathered onto rank 0
        (``gathered_student_state``) into an unsharded copy built from the student's config; this needs CPU
        memory for one full copy on rank 0. Otherwise ``self.student`` itself.
        """
        if not isinstance(self.trainer.strategy, FSDPStrategy | ModelParallelStrategy):
            return self.student if self.trainer.is_global_zero else None
        state = self.gathered_student_state()
        if not self.trainer.is_global_zero:
            return None
        sharded = getattr(self.student, "module", self.student)  # unwrap a wrapped root
        copy = type(sharded)(sharded.config).to(dtype=next(iter(state.values())).dtype)
        copy.load_state_dict(state)
        return copy.to(self.device)

    def gathered_student_state(self) -> dict[str, Tensor] | None:
        """Under FSDP the student's full (unsharded) state dict on CPU on rank 0, empty on the other ranks;
        otherwise None.

        Collective: every rank must call it. Works with ``state_dict_type: sharded`` checkpoints too.

        On GPUs the gather is offloaded to CPU and kept on rank 0 only (``cpu_offload``: one full copy in
        CPU memory, not one per GPU). When the shards already live on the CPU (FSDP on CPU with
        gloo: the multi-GPU tests) it is not offloaded: FSDP1's offload (``FlatParamHandle.to_cpu``) frees
        the gathered parameters' storage when ``.to("cpu")`` made no copy, and the state-dict hook then
        clones freed memory (segfault on rank 0; pytorch#188989, still so in torch 2.13). Without offload
        every rank gathers, and the non-zero ranks drop their copy. tests/multigpu/test_fsdp_export.py.
        """
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy | ModelParallelStrategy):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=strategy.root_device.type != "cpu")
        state = get_model_state_dict(strategy.model, options=options)
        if not self.trainer.is_global_zero:
            return {}
        return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
