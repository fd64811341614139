"""Stage III: merge domain experts that share one stage-I student (METHOD.md), by streaming or by learning.

Three entry points:

* :func:`merge_experts` -- θ = Σ λ_i θ_i with fixed λ, streamed: safetensors are read chunk by chunk
  (``safetensors.safe_open``, reopened per chunk so no expert stays memory-mapped) and the output file is
  written chunk by chunk behind a precomputed header, so peak memory is a few chunks, not K models.
* :class:`MergeModule` -- ``lit-xdistill fit --config configs/merge.yaml``: fixed weights (``learn:
  false``) or merge coefficients learned by minimising the KD loss with the experts frozen.
* :func:`merge_report` -- held-out KD loss / perplexity per domain for experts, merges and a generalist.

Compatibility (:func:`check_experts`) is checked before any tensor is read: same teacher, same
architecture and config (``lineage`` and name fields aside), same stage-I seed when recorded, same
tokenizer files (sha256), same tensor names, shapes and dtypes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from torch.func import functional_call

from ..models import XDistillForCausalLM
from ..teachers import TeacherSpec
from .base import StageHandoffError, warmup_then
from .kd import KDModule
from .losses import kd_loss

__all__ = [
    "ExpertSet",
    "MergeCompatibilityError",
    "MergeModule",
    "check_experts",
    "merge_experts",
    "merge_report",
    "normalise_weights",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
CONFIG_FREE_KEYS = ("lineage", "_name_or_path", "transformers_version")  # may differ between experts
INDEX_FILE = "model.safetensors.index.json"
COEFFICIENTS_FILE = "merge_coefficients.json"
CHUNK_ELEMENTS = 1 << 24  # 16M elements (64 MB in fp32) per expert and chunk
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class MergeCompatibilityError(StageHandoffError):
    """Experts that cannot be averaged: the message names the two experts and what differs."""


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of an exported student (single file or sharded with an index)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"expert {folder}: no model.safetensors nor {INDEX_FILE}; export it with "
            "save_pretrained (safetensors), e.g. a stage-II run's export_dir"
        )
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def _tensor_specs(files: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), read from the headers only."""
    specs = {}
    for file in sorted(set(files.values())):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                specs[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return specs


@dataclass
class Expert:
    """One expert folder: config, tokenizer digests, tensor layout."""

    path: Path
    config: dict
    tokenizer: dict[str, str]
    files: dict[str, Path]
    specs: dict[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def read(cls, path: str | os.PathLike) -> Expert:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"expert {folder}: no config.json (expected an exported student folder)")
        config = json.loads((folder / "config.json").read_text())
        tokenizer = {n: _sha256(folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()}
        files = _tensor_files(folder)
        return cls(folder, config, tokenizer, files, _tensor_specs(files))

    @property
    def seed(self) -> str | None:
        """The stage-I student this expert started from (``lineage.seed``), when recorded."""
        return (self.config.get("lineage") or {}).get("seed")


@dataclass
class ExpertSet:
    """Experts that passed :func:`check_experts`; ``seed`` is their shared stage-I seed (None: unrecorded)."""

    experts: list[Expert]
    seed: str | None

    @property
    def teacher_identity(self) -> str | None:
        return self.experts[0].config.get("teacher_identity")

    @property
    def num_layers(self) -> int:
        return int(self.experts[0].config["teacher_config"]["num_hidden_layers"])


def _differences(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [
        f"{k} ({a.get(k, '<missing>')!r} vs {b.get(k, '<missing>')!r})" for k in keys if a.get(k) != b.get(k)
    ]


def _check_pair(ref: Expert, other: Expert) -> None:
    pair = f"{other.path} and {ref.path}"
    t_ref, t_other = ref.config.get("teacher_identity"), other.config.get("teacher_identity")
    if t_ref != t_other:
        raise MergeCompatibilityError(
            f"different teacher: {other.path} was distilled from {t_other!r}, {ref.path} from {t_ref!r}; "
            "merge only experts trained from the same stage-I student of one teacher"
        )
    arch = _differences(ref.config.get("teacher_config", {}), other.config.get("teacher_config", {}))
    if arch:
        raise MergeCompatibilityError(
            f"different architecture: {pair} differ in teacher_config {', '.join(arch)}"
        )
    strip = lambda c: {k: v for k, v in c.items() if k not in CONFIG_FREE_KEYS + ("teacher_config",)}
    rest = _differences(strip(ref.config), strip(other.config))
    if rest:
        raise MergeCompatibilityError(f"different student config: {pair} differ in {', '.join(rest)}")
    if ref.seed and other.seed and ref.seed != other.seed:
        raise MergeCompatibilityError(
            f"different seed lineage: {other.path} started from stage-I student {other.seed}, "
            f"{ref.path} from {ref.seed}; experts must all be fine-tuned from the same stage-I export"
        )
    tok = _differences(ref.tokenizer, other.tokenizer)
    if tok:
        raise MergeCompatibilityError(
            f"different tokenizer: {pair} differ in tokenizer files (sha256) "
            f"{', '.join(t[:120] for t in tok)}"
        )
    names = set(ref.specs) ^ set(other.specs)
    if names:
        raise MergeCompatibilityError(f"different tensors: {sorted(names)[:5]} present in only one of {pair}")
    bad = [f"{n}: {other.specs[n]} vs {ref.specs[n]}" for n in ref.specs if other.specs[n] != ref.specs[n]]
    if bad:
        raise MergeCompatibilityError(f"different tensor dtype/shape in {pair}: {'; '.join(bad[:5])}")


def check_experts(paths: Sequence[str | os.PathLike]) -> ExpertSet:
    """Read every expert's config, tokenizer digests and safetensors headers; raise on any mismatch.

    Raises :class:`MergeCompatibilityError` naming the pair of experts and the first kind of difference,
    in this order: teacher, architecture (``teacher_config``), other config fields, seed lineage,
    tokenizer files, tensor names, tensor dtypes/shapes. Without a recorded ``lineage.seed`` the shared
    start cannot be proven: teacher + architecture + config are then the check, with a warning.
    """
    if not paths:
        raise ValueError("no experts given: name at least one exported expert folder")
    experts = [Expert.read(p) for p in paths]
    for other in experts[1:]:
        _check_pair(experts[0], other)
    seeds = {e.seed for e in experts}
    if None in seeds:
        warnings.warn(
            "some experts record no lineage.seed (the stage-I student they started from): only teacher, "
            "architecture, config and tokenizer were compared; a shared starting point is assumed",
            stacklevel=2,
        )
    return ExpertSet(experts, next((s for s in seeds if s), None))


def normalise_weights(weights: Sequence[float], k: int) -> list[float]:
    """Check ``k`` finite weights >= 0, not all 0; weights not summing to 1 are normalised (warning)."""
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"{len(w)} merge weights for {k} experts: give one weight per expert")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"merge weights must be finite, >= 0 and not all 0 (got {w})")
    total = sum(w)
    if abs(total - 1) > 1e-6:
        w = [x / total for x in w]
        warnings.warn(
            f"merge weights {list(weights)} sum to {total:g}, not 1: normalised to "
            f"{[round(x, 6) for x in w]}",
            stacklevel=2,
        )
    return w


def layer_group(name: str, num_layers: int) -> int:
    """Coefficient group of a tensor: its decoder layer index, or ``num_layers`` for embeddings/norm/head."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else num_layers


# -- streaming ------------------------------------------------------------------------------------------
def _read_rows(file: Path, name: str, rows: slice | None) -> Tensor:
    """One chunk of one tensor; the file is opened (mapped) only for this read."""
    with safe_open(file, "pt") as f:
        return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


def _chunks(shape: tuple[int, ...]) -> list[slice | None]:
    if not shape or math.prod(shape) <= CHUNK_ELEMENTS:
        return [None]
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    return [slice(s, min(s + step, shape[0])) for s in range(0, shape[0], step)]


def _merge_chunk(experts: list[Expert], name: str, rows: slice | None, weights: Sequence[float]) -> Tensor:
    dtype = _DTYPES[experts[0].specs[name][0]]
    if not dtype.is_floating_point:  # integer/bool tensors are not averaged: they must agree
        first = _read_rows(experts[0].files[name], name, rows)
        for e in experts[1:]:
            if not torch.equal(first, _read_rows(e.files[name], name, rows)):
                raise MergeCompatibilityError(
                    f"non-float tensor {name} differs between {experts[0].path} "
                    f"and {e.path}: it cannot be averaged"
                )
        return first
    acc = None
    for e, w in zip(experts, weights):
        part = _read_rows(e.files[name], name, rows).to(torch.float32)
        acc = part.mul_(w) if acc is None else acc.add_(part, alpha=w)
    return acc.to(dtype)


def _write_shard(
    experts: list[Expert], file_name: str, out: Path, weights_of: Callable[[str], Sequence[float]]
) -> None:
    """Write one safetensors file: header first (offsets known from the headers), then chunk after chunk."""
    ref = experts[0]
    source = ref.path / file_name
    with safe_open(source, "pt") as f:
        metadata = f.metadata() or {}
    names = sorted(n for n, p in ref.files.items() if p == source)
    header, offset = {}, 0
    for name in names:
        code, shape = ref.specs[name]
        size = math.prod(shape) * torch.empty((), dtype=_DTYPES[code]).element_size()
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out / file_name, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            weights = weights_of(name)
            for rows in _chunks(ref.specs[name][1]):
                chunk = _merge_chunk(experts, name, rows, weights).contiguous()
                f.write(chunk.reshape(-1).view(torch.uint8).numpy().data)


def _atomic_folder(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling folder, then move it into place (an old ``out_dir`` is replaced last)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
    try:
        fill(tmp)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def stream_merge(
    expert_set: ExpertSet,
    weights_of: Callable[[str], Sequence[float]],
    out_dir: str | os.PathLike,
    lineage: dict,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write Σ_i w_i(name) θ_i[name] for every tensor to ``out_dir`` with the first expert's files layout.

    ``weights_of(name)`` gives the (already validated) weights of one tensor. Config (with ``lineage``),
    generation config, tokenizer files and the shard index are copied from the first expert;
    ``extra_files`` (name -> text) are written alongside. Prints the peak RSS of the process.
    """
    experts = expert_set.experts
    out = Path(out_dir).expanduser()
    if any(out.resolve() == e.path.resolve() for e in experts):
        raise ValueError(f"out_dir {out} is one of the experts: write the merge to a new folder")
    ref, started = experts[0], time.perf_counter()

    def fill(tmp: Path) -> None:
        for file_name in sorted({p.name for p in ref.files.values()}):
            _write_shard(experts, file_name, tmp, weights_of)
        for name in (INDEX_FILE, "generation_config.json", *ref.tokenizer):
            if (ref.path / name).is_file():
                shutil.copy2(ref.path / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps({**ref.config, "lineage": lineage}, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    _atomic_folder(out, fill)
    size = sum(math.prod(s) * torch.empty((), dtype=_DTYPES[c]).element_size() for c, s in ref.specs.values())
    print(
        f"[lit-xdistill] merged {len(experts)} experts ({size / 2**30:.2f} GiB each) into {out} in "
        f"{time.perf_counter() - started:.1f} s; peak RSS {peak_rss_gb():.2f} GiB",
        flush=True,
    )
    return out


def _merge_lineage(expert_set: ExpertSet, coefficients: object) -> dict:
    return {
        "seed": expert_set.seed,
        "stage": "merge",
        "teacher": expert_set.teacher_identity,
        "experts": [
            {"path": str(e.path), "lineage": e.config.get("lineage", {})} for e in expert_set.experts
        ],
        "coefficients": coefficients,
    }


def merge_experts(paths: list[str], weights: list[float], out_dir: str) -> Path:
    """Merge exported experts by the weighted average θ = Σ λ_i θ_i, streaming tensor chunk by chunk.

    Args:
        paths: exported expert folders (stage II results that started from one stage-I student).
        weights: λ_i >= 0, one per expert; weights not summing to 1 are normalised, with a warning.
        out_dir: folder to write (plain HF student: safetensors, config with merge lineage, tokenizer).
    """
    expert_set = check_experts(paths)
    w = normalise_weights(weights, len(paths))
    return stream_merge(expert_set, lambda name: w, out_dir, _merge_lineage(expert_set, w))


# -- learned coefficients -------------------------------------------------------------------------------
class MergeModule(KDModule):
    """Stage III (METHOD.md): merge frozen experts, with fixed weights or learned merge coefficients.

    ``learn: false``: the experts are merged by streaming (:func:`merge_experts`) into ``export_dir``
    (a temporary folder without one) when the model is configured; ``fit`` then trains nothing and
    ``validate`` reports the KD loss of that merge (use it to sweep weights).

    ``learn: true``: all K experts are held in memory (fine for small students; 8B experts need the
    streaming path) and the coefficients are the only parameters: λ = softmax(logits) per expert
    (per decoder layer with ``per_layer``, plus one group for embeddings, final norm and head), so λ
    stays on the simplex. Each step evaluates the student with θ = Σ λ_i θ_i computed on the fly
    (``torch.func.functional_call``) and minimises the KD loss of ``KDModule`` (cached top-k from the
    batch, else a live teacher). At the end of ``fit`` the merge with the learned λ is streamed from
    the expert files to ``export_dir`` together with ``merge_coefficients.json``. λ is fitted on the
    data module's train split: give the merge run a small mix of every domain (``data.max_train_tokens``).

    Args:
        experts: exported expert folders, all fine-tuned from the same stage-I student.
        weights: fixed merge weights λ_i >= 0 (normalised with a warning when they do not sum to 1);
            with ``learn`` they initialise the coefficients. None: uniform.
        learn: learn the merge coefficients by minimising the KD loss (experts frozen).
        per_layer: learn one coefficient vector per decoder layer (else one per expert).
        teacher: the teacher the experts were distilled from (checked against their ``teacher_identity``).
        lr: Adam learning rate of the coefficient logits.
        warmup_steps: linear warm-up steps.
        ce_weight: weight of the next-token cross-entropy in the KD loss.
        kl_weight: weight of KL(teacher || student) on the teacher's top-k.
        top_k: teacher tokens kept per position for a live teacher.
        export_dir: write the merged student (plain HF folder) here.
    """

    def __init__(
        self,
        experts: list[str],
        weights: list[float] | None = None,
        learn: bool = False,
        per_layer: bool = False,
        teacher: TeacherSpec | None = None,
        lr: float = 5e-2,
        warmup_steps: int = 0,
        ce_weight: float = 0.9,
        kl_weight: float = 0.1,
        top_k: int = 256,
        export_dir: str | None = None,
    ):
        super().__init__(teacher, None, lr, warmup_steps, 0.0, ce_weight, kl_weight, top_k, "all", export_dir)
        if not experts:
            raise ValueError("experts is empty: list the exported expert folders to merge")
        if per_layer and not learn:
            raise ValueError("per_layer needs learn: true (fixed weights are one value per expert)")
        self.experts = list(experts)
        self.weights = None if weights is None else normalise_weights(weights, len(experts))
        self.learn, self.per_layer = learn, per_layer
        self.expert_set: ExpertSet | None = None
        self.merge_logits: torch.nn.Parameter | None = None
        self._stacked: dict[str, Tensor] = {}  # name -> (K, ...) expert tensors; kept out of checkpoints
        self._tmp_dir: str | None = None

    def configure_model(self) -> None:
        """Check the experts, then load the fixed merge or the frozen experts and the coefficients."""
        if self.student is not None:
            return
        self.expert_set = check_experts(self.experts)
        found = self.expert_set.teacher_identity
        if found != self.teacher_spec.identity:
            raise MergeCompatibilityError(
                f"the experts were distilled from teacher {found!r}, but model.teacher is "
                f"{self.teacher_spec.identity!r}: set model.teacher to the experts' teacher"
            )
        if not self.learn:
            self.student = XDistillForCausalLM.from_pretrained(self._fixed_merge(), dtype=torch.float32)
            self.student.requires_grad_(False)
            return
        models = [XDistillForCausalLM.from_pretrained(p, dtype=torch.float32) for p in self.experts]
        self.student = models[0].requires_grad_(False)
        params = [dict(m.named_parameters()) for m in models]
        self._stacked = {n: torch.stack([p[n].detach() for p in params]) for n in params[0]}
        groups = self.expert_set.num_layers + 1 if self.per_layer else 1
        init = torch.tensor(self.weights or [1.0] * len(self.experts)).clamp_min(1e-6).log()
        self.merge_logits = torch.nn.Parameter(init.expand(groups, -1).clone())

    def _fixed_merge(self) -> Path:
        target = self.export_dir
        if target is None:
            self._tmp_dir = target = tempfile.mkdtemp(prefix="lit-xdistill-merge-")
        weights = self.weights or [1 / len(self.experts)] * len(self.experts)
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            stream_merge(
                self.expert_set, lambda name: weights, target, _merge_lineage(self.expert_set, weights)
            )
        if trainer is not None:
            trainer.strategy.barrier("merge")
        return Path(target)

    def setup(self, stage: str) -> None:
        """Fixed weights: ``fit`` has nothing to train (the merge is written by ``configure_model``)."""
        if stage == "fit" and not self.learn:
            self.trainer.limit_train_batches = 0

    def teardown(self, stage: str) -> None:
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def select_trainable(self) -> None:
        self.student.requires_grad_(False)

    def coefficients(self) -> Tensor:
        """λ, shape (groups, K): softmax of the logits (rows on the simplex)."""
        return self.merge_logits.softmax(-1)

    def _group(self, name: str) -> int:
        return layer_group(name, self.expert_set.num_layers) if self.per_layer else 0

    def merged_parameters(self) -> dict[str, Tensor]:
        """θ = Σ λ_i θ_i for every student parameter, differentiable in the coefficient logits."""
        lam = self.coefficients()
        for name, stacked in self._stacked.items():
            if stacked.device != lam.device:
                self._stacked[name] = stacked.to(lam.device)
        return {n: torch.tensordot(lam[self._group(n)], t, dims=1) for n, t in self._stacked.items()}

    def _losses(self, batch: dict[str, Tensor]):
        if not self.learn:
            return super()._losses(batch)
        topk_ids, topk_lp = self.teacher_topk(batch)
        out = functional_call(
            self.student, self.merged_parameters(), args=(), kwargs=self.student_inputs(batch)
        )
        lam = self.coefficients().detach().mean(0)
        self.log_dict({f"merge/lambda_{i}": v for i, v in enumerate(lam)})
        return kd_loss(out.logits, batch["labels"], topk_ids, topk_lp, self.ce_weight, self.kl_weight)

    def configure_optimizers(self):
        if not self.learn:
            return None
        optimizer = torch.optim.Adam([self.merge_logits], lr=self.lr)
        schedule = partial(
            warmup_then, warmup=max(1, self.warmup_steps), total=1, decay="constant", final_ratio=1.0
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/grad_norm", self.merge_logits.grad.detach().norm(), on_step=True)

    def export(self, path: str | os.PathLike, state: dict | None = None) -> Path:
        """Stream the merge with the learned λ from the expert files; λ also goes to a JSON file.

        Args:
            path: the folder to write.
            state: unused: the merged weights are streamed from the expert files, not gathered.
        """
        lam = self.coefficients().detach().cpu().double()
        rows = lam.tolist()
        groups = (
            [f"layer_{i:02d}" for i in range(self.expert_set.num_layers)] + ["other"]
            if self.per_layer
            else ["all"]
        )
        record = {
            "experts": self.experts,
            "per_layer": self.per_layer,
            "lambda": {g: r for g, r in zip(groups, rows)},
        }
        weights_of = lambda name: rows[self._group(name)]
        return stream_merge(
            self.expert_set,
            weights_of,
            path,
            _merge_lineage(self.expert_set, record["lambda"]),
            {COEFFICIENTS_FILE: json.dumps(record, indent=2) + "\n"},
        )

    def on_train_end(self) -> None:
        if self.learn:
            super().on_train_end()


# -- report ---------------------------------------------------------------------------------------------
def _heldout_batches(
    teacher: TeacherSpec, sources: list[str], seq_len: int, blocks: int, batch_size: int, cache_dir: str
) -> list[dict[str, Tensor]]:
    from torch.utils.data import DataLoader, Subset

    from ..data import DistillDataModule

    dm = DistillDataModule(
        tokenizer=teacher.name, sources=sources, seq_len=seq_len, batch_size=batch_size, cache_dir=cache_dir
    )
    dm.prepare_data()
    dm.setup()
    heldout = dm.datasets["heldout"]
    if len(heldout) == 0:
        raise ValueError(f"sources {sources} hold no held-out block of seq_len={seq_len}: lower seq_len")
    return list(DataLoader(Subset(heldout, range(min(blocks, len(heldout)))), batch_size=batch_size))


@torch.no_grad()
def _evaluate(
    model: XDistillForCausalLM,
    batches: list[dict[str, Tensor]],
    teacher_topk: list,
    device: str,
    ce_weight: float,
    kl_weight: float,
) -> tuple[float, float]:
    """Token-weighted held-out KD loss and perplexity (exp of the mean CE)."""
    loss = ce = tokens = 0.0
    for batch, (ids, lps) in zip(batches, teacher_topk):
        inputs = {k: batch[k].to(device) for k in ("input_ids", "segment_ids", "position_ids")}
        out = kd_loss(model(**inputs).logits, batch["labels"].to(device), ids, lps, ce_weight, kl_weight)
        loss, ce, tokens = (
            loss + out.loss.item() * out.tokens,
            ce + out.ce.item() * out.tokens,
            tokens + out.tokens,
        )
    return loss / tokens, math.exp(ce / tokens)


def merge_report(
    models: dict[str, str],
    domains: dict[str, list[str]],
    teacher: str,
    out_dir: str,
    seq_len: int = 1024,
    blocks: int = 16,
    batch_size: int = 4,
    ce_weight: float = 0.9,
    kl_weight: float = 0.1,
    top_k: int = 256,
    device: str = "auto",
    cache_dir: str = ".cache/lit_xdistill/data",
) -> Path:
    """Held-out KD loss and perplexity per domain for every model: ``<out_dir>/merge_report.md`` (+ .png).

    Args:
        models: row label -> exported student folder (experts, uniform merge, learned merge, generalist).
        domains: column label -> data sources of that domain (as in ``data.sources``).
        teacher: the teacher (any ``TeacherSpec`` name) whose top-k the KL term uses and whose tokenizer
            tokenises the data.
        out_dir: folder for ``merge_report.md``, ``merge_report.json`` and ``merge_report.png``.
        seq_len: tokens per evaluation block.
        blocks: at most this many held-out blocks per domain (the ``heldout`` split, never trained on).
        batch_size: blocks per forward pass.
        ce_weight: CE weight of the reported KD loss.
        kl_weight: KL weight of the reported KD loss.
        top_k: teacher tokens kept per position.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
        cache_dir: token cache folder of the data module.
    """
    from ..models import student_from_teacher
    from .losses import topk_logprobs

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    spec = TeacherSpec(teacher, dtype="float32")
    live = student_from_teacher(spec.load_model(), spec.identity, mixer="attention").to(dev).eval()
    data = {}
    for domain, sources in domains.items():
        batches = _heldout_batches(spec, sources, seq_len, blocks, batch_size, cache_dir)
        topk = []
        for b in batches:
            logits = live(**{k: b[k].to(dev) for k in ("input_ids", "segment_ids", "position_ids")}).logits
            ids, lps = topk_logprobs(logits.flatten(0, 1), top_k)
            topk.append((ids.view(*logits.shape[:2], -1), lps.view(*logits.shape[:2], -1)))
        data[domain] = (batches, topk)
    del live
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for label, path in models.items():
        model = XDistillForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        if model.config.teacher_identity != spec.identity:
            raise MergeCompatibilityError(
                f"model {label} ({path}) was distilled from "
                f"{model.config.teacher_identity!r}, not from {spec.identity!r}"
            )
        results[label] = {d: _evaluate(model, b, t, dev, ce_weight, kl_weight) for d, (b, t) in data.items()}
        del model
    return _write_report(results, list(domains), Path(out_dir), teacher, seq_len, blocks)


def _write_report(
    results: dict[str, dict[str, tuple[float, float]]],
    domains: list[str],
    out: Path,
    teacher: str,
    seq_len: int,
    blocks: int,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    head = "| model | " + " | ".join(f"{d} KD loss | {d} ppl" for d in domains) + " | mean KD loss |"
    lines = [
        f"# Merge report\n\nTeacher `{teacher}`; held-out split, up to {blocks} blocks of {seq_len} "
        "tokens per domain; KD loss = 0.9 CE + 0.1 top-k KL (lower is better).\n",
        head,
        "|" + "---|" * (2 * len(domains) + 2),
    ]
    for label, row in results.items():
        cells = " | ".join(f"{row[d][0]:.4f} | {row[d][1]:.2f}" for d in domains)
        lines.append(f"| {label} | {cells} | {sum(row[d][0] for d in domains) / len(domains):.4f} |")
    (out / "merge_report.md").write_text("\n".join(lines) + "\n")
    (out / "merge_report.json").write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains) * max(1, len(results)) / 2, 3.5))
    width = 0.8 / len(results)
    for i, (label, row) in enumerate(results.items()):
        ax.bar([d + i * width for d in range(len(domains))], [row[d][0] for d in domains], width, label=label)
    ax.set_xticks([d + 0.4 - width / 2 for d in range(len(domains))], domains)
    ax.set_ylabel("held-out KD loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "merge_report.png", dpi=120)
    plt.close(fig)
    return out / "merge_report.md"
