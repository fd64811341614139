"""Domain experts on disk: compatibility checks and the streaming weighted merge (stage III).

:func:`merge_experts` computes θ = Σ λ_i θ_i with fixed λ, streamed: safetensors are read chunk by chunk
(``safetensors.safe_open``, reopened per chunk so no expert stays memory-mapped) and the output file is
written chunk by chunk behind a precomputed header, so peak memory is a few chunks, not K models.

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
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from .base import StageHandoffError

__all__ = [
    "Expert",
    "ExpertSet",
    "MergeCompatibilityError",
    "check_experts",
    "layer_group",
    "merge_experts",
    "merge_lineage",
    "normalise_weights",
    "peak_rss_gb",
    "stream_merge",
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


def merge_lineage(expert_set: ExpertSet, coefficients: object) -> dict:
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
    return stream_merge(expert_set, lambda name: w, out_dir, merge_lineage(expert_set, w))


# -- learned coefficients -------------------------------------------------------------------------------
