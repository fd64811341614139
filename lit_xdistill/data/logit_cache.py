"""Teacher top-k logit cache: run the teacher once over all blocks, read its top-k in stage II.

One folder per split (``write_topk_cache(..., out_dir)`` writes exactly ``out_dir``; the data module's
``logit_cache`` takes such a folder, or a root holding ``train/`` and optionally ``val/``):

* ``shard-00000.safetensors`` ...: ``topk_ids`` int32 (n, S, k) and ``topk_logprobs`` float16 (n, S, k)
  for n consecutive blocks of the split (dataset order, not epoch order; shard i holds blocks
  [i * n, (i + 1) * n), the last one fewer), best first. Log-probs are
  ``log_softmax`` over the FULL vocabulary computed in float32, then rounded to float16: relative error
  at most 2**-11 of the value (under 5e-4 for log-probs in [-1, 0], under 8e-3 at -20), and
  ``exp`` of them sums to at most 1 over the k tokens (up to that rounding).
* ``manifest.json``: teacher identity, tokenizer and data fingerprints, split, seq_len, k, vocab size,
  number of blocks, and per shard its file, first block, block count, size in bytes and sha256.

Writing is atomic and resumable, in one process or data parallel over the ranks of a process group
(``torchrun``: rank r computes the shards i with i % W == r; rank 0 alone prepares the folder and writes the
manifest). Shards go to a sibling ``.<name>.partial/`` folder that rank 0 creates with the write's
configuration in ``key.json`` (the teacher's vocabulary size follows in ``vocab.json``, before the first
shard). Each file is written under a temporary name and renamed, so a shard is finished exactly when its
final file exists. An interrupted write continues, with any number of ranks, with the missing shards (a
partial folder of another configuration is discarded); the manifest is built from the finished shards, and
the folder gets its final name only once the manifest is in it. The finished cache does not depend on the
number of ranks.
The reader refuses a cache whose manifest does not match the data module and detects truncated or
altered shards (size at open, sha256 on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..modules.losses import topk_logprobs

if TYPE_CHECKING:
    from .datamodule import DistillDataModule

__all__ = ["LogitCacheError", "TopKLogitCache", "write_topk_cache"]

_FORMAT = 1
_SHARD_BYTES = 256 << 20  # target shard size
_LOGPROB_DTYPE = torch.float16


class LogitCacheError(ValueError):
    """A logit cache that is missing, incomplete, corrupted or written for other data/teacher."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, payload: dict) -> None:
    """Atomic, also when several ranks write the same file: each through its own temporary file."""
    handle, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _check_disk(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed * 1.05 > free:
        raise LogitCacheError(
            f"The logit cache needs about {needed / 2**30:.1f} GiB but {directory} has "
            f"{free / 2**30:.1f} GiB free: free space, choose another out_dir, or lower k."
        )


def write_topk_cache(
    teacher: torch.nn.Module,
    datamodule: DistillDataModule,
    out_dir: str,
    k: int = 256,
    batch_size: int = 8,
    *,
    teacher_identity: str,
    device: str = "cpu",
    split: str = "train",
    blocks_per_shard: int | None = None,
) -> Path:
    """Run ``teacher`` once over every block of ``split`` and store its top-k next-token log-probs.

    In one process, or called by every rank of an initialised ``torch.distributed`` process group (e.g. under
    ``torchrun``; with NCCL each rank's current CUDA device must be its own): data parallel, each rank runs its
    own full copy of the teacher (not sharded: an 8B teacher is 16 GB in bf16, it fits any GPU) on every
    W-th shard, rank 0 prepares the folder and writes the manifest, the others wait for it. ``out_dir`` must
    be on a file system every rank sees. The finished cache is the same, byte for byte, whatever the number of
    ranks: a shard always holds the same blocks, computed in the same batches. When a rank fails, every rank
    raises (the others once their own shards are written); rerunning, with any number of ranks, continues.

    Args:
        teacher: called as ``teacher(input_ids=, position_ids=, segment_ids=)``, returning an object with
            ``.logits`` (B, S, V); it must keep documents apart using ``segment_ids``.
        datamodule: the data module whose blocks are scored (``prepare_data`` is run if needed, on rank 0).
        out_dir: the folder to write this split's cache to (e.g. ``runs/kd/logits/train``).
        k: how many top tokens to keep per position (the paper uses 256).
        batch_size: blocks per teacher forward.
        teacher_identity: a string naming the teacher (e.g. ``TeacherSpec.identity``), checked by readers.
        device: where this rank's teacher runs (e.g. ``cuda:<local rank>``).
        split: ``train``, ``val`` or ``heldout``.
        blocks_per_shard: blocks per shard file; None aims at about 256 MiB per shard.

    Returns:
        The finished cache folder ``out_dir`` (on every rank).
    """
    from tqdm.auto import tqdm

    rank, world = _rank_and_world()
    if k < 1:
        raise LogitCacheError(f"k must be at least 1, got {k}.")
    _step_then_sync(world, datamodule.prepare_data if rank == 0 else None)  # tokenise once, on rank 0
    dataset = datamodule.dataset(split)
    if len(dataset) == 0:
        raise LogitCacheError(
            f"Split {split!r} has no blocks of seq_len={datamodule.seq_len}: nothing to cache."
        )
    key = {
        "format": _FORMAT,
        "teacher": teacher_identity,
        "split": split,
        "seq_len": datamodule.seq_len,
        "k": k,
        "tokenizer_fingerprint": datamodule.tokenizer_fingerprint,
        "data_fingerprint": datamodule.data_fingerprint(split),
        "num_blocks": len(dataset),
        "logprob_dtype": "float16",
        "ids_dtype": "int32",
    }
    target = Path(out_dir)
    partial = target.with_name(f".{target.name}.partial")
    # Every rank decides this alike: the folder gets its final name only after the last synchronisation.
    if (target / "manifest.json").is_file():
        existing = json.loads((target / "manifest.json").read_text())
        if {name: existing.get(name) for name in key} == key:
            return target
        raise LogitCacheError(
            f"{target} already holds a logit cache for another configuration: choose "
            "another out_dir or delete that folder."
        )
    block_bytes = datamodule.seq_len * k * (4 + 2)
    per_shard = blocks_per_shard or max(1, _SHARD_BYTES // block_bytes)
    ranges = [(first, min(first + per_shard, len(dataset))) for first in range(0, len(dataset), per_shard)]
    # Shard file names stand for block ranges, so the shard size belongs to the partial folder's key.
    partial_key = {**key, "blocks_per_shard": per_shard}

    def prepare() -> None:
        _open_partial(partial, partial_key)
        done = sum(stop - first for i, (first, stop) in enumerate(ranges) if (partial / _shard_name(i)).is_file())
        _check_disk(target.parent, (len(dataset) - done) * block_bytes)

    _step_then_sync(world, prepare if rank == 0 else None)
    mine = [i for i in range(rank, len(ranges), world) if not (partial / _shard_name(i)).is_file()]

    def compute() -> None:
        from safetensors.torch import save_file

        teacher.eval().to(device)
        bar = tqdm(
            total=sum(ranges[i][1] - ranges[i][0] for i in mine),
            desc=f"teacher top-{k} ({split}{f', rank 0 of {world}' if world > 1 else ''})",
            unit=" blocks",
            disable=rank != 0,
        )
        for i in mine:
            loader = DataLoader(torch.utils.data.Subset(dataset, range(*ranges[i])), batch_size=batch_size)
            parts_ids, parts_logprobs = [], []
            for batch in loader:
                with torch.inference_mode():
                    logits = teacher(
                        **{name: batch[name].to(device) for name in ("input_ids", "position_ids", "segment_ids")}
                    ).logits
                    if k > logits.shape[-1]:
                        raise LogitCacheError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}.")
                    ids, logprobs = topk_logprobs(logits, k)
                    logprobs = logprobs.to(_LOGPROB_DTYPE)
                parts_ids.append(ids.cpu())
                parts_logprobs.append(logprobs.cpu())
                bar.update(len(batch["input_ids"]))
            # A shard exists under its final name only once complete (no rank reads a half-written file).
            tmp = partial / (_shard_name(i) + ".tmp")
            save_file({"topk_ids": torch.cat(parts_ids), "topk_logprobs": torch.cat(parts_logprobs)}, str(tmp))
            if not (partial / "vocab.json").is_file():  # for the manifest; before any shard is finished
                _write_json(partial / "vocab.json", {"vocab_size": logits.shape[-1]})
            os.replace(tmp, partial / _shard_name(i))
        bar.close()

    _step_then_sync(world, compute)

    def finish() -> None:
        shards = []
        for i, (first, stop) in enumerate(ranges):
            file = partial / _shard_name(i)
            shards.append(
                {
                    "file": file.name,
                    "first_block": first,
                    "num_blocks": stop - first,
                    "bytes": file.stat().st_size,
                    "sha256": _sha256(file),
                }
            )
        vocab_size = json.loads((partial / "vocab.json").read_text())["vocab_size"]
        _write_json(partial / "manifest.json", {**key, "vocab_size": vocab_size, "shards": shards})
        (partial / "key.json").unlink()
        (partial / "vocab.json").unlink()
        os.replace(partial, target)

    _step_then_sync(world, finish if rank == 0 else None)
    return target


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _step_then_sync(world: int, step: Callable[[], None] | None) -> None:
    """Run ``step`` (None: nothing on this rank), then wait for every rank (a barrier that also carries each
    rank's outcome): when a rank's step failed every rank raises, the failed one its own error, instead of
    waiting for it until the process group times out."""
    error = None
    try:
        if step is not None:
            step()
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks learnt of it
        error = exc
    if world > 1:
        outcomes: list[str | None] = [None] * world
        torch.distributed.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, outcome) for r, outcome in enumerate(outcomes) if outcome]
        if failed and error is None:
            raise LogitCacheError(
                "Writing the logit cache failed on "
                + "; ".join(f"rank {r} ({outcome})" for r, outcome in failed)
                + ": rerun to continue from the finished shards."
            )
    if error is not None:
        raise error


def _open_partial(partial: Path, key: dict) -> None:
    """Keep the folder of an interrupted write with the same key (its finished shards), else start it afresh."""
    stored = partial / "key.json"
    if stored.is_file() and json.loads(stored.read_text()) == key:
        for tmp in partial.glob("*.tmp"):  # left by an interrupted rank
            tmp.unlink()
        return
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_json(stored, key)


class TopKLogitCache:
    """Reads one split of a finished logit cache; item ``i`` belongs to the data module's block ``i``.

    Args:
        path: the split folder (``<out_dir>/<split>``) holding ``manifest.json`` and the shards.
        verify_checksums: check each shard's sha256 the first time this process reads it.
    """

    def __init__(self, path: str | Path, verify_checksums: bool = True) -> None:
        self.path, self.verify_checksums = Path(path), verify_checksums
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            hint = (
                (
                    " An interrupted write is in "
                    + str(self.path.parent / f".{self.path.name}.partial")
                    + ": rerun write_topk_cache to finish it."
                )
                if (self.path.parent / f".{self.path.name}.partial").exists()
                else ""
            )
            raise LogitCacheError(f"{self.path} is not a finished logit cache (no manifest.json).{hint}")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                raise LogitCacheError(
                    f"Logit cache shard {file} is missing or truncated ({size} bytes, manifest "
                    f"says {shard['bytes']}): rewrite the cache with write_topk_cache."
                )
        self._first = np.array([s["first_block"] for s in self.manifest["shards"]])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.manifest["num_blocks"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}  # worker processes open their own handles

    def validate(
        self,
        *,
        split: str,
        tokenizer_fingerprint: str,
        data_fingerprint: str,
        seq_len: int,
        num_blocks: int,
        teacher: str | None = None,
    ) -> None:
        """Refuse (naming the mismatch) a cache written for another split, tokenizer, data, seq_len or
        teacher (``teacher=None`` skips the teacher check)."""
        expected = {
            "split": split,
            "seq_len": seq_len,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "data_fingerprint": data_fingerprint,
            "num_blocks": num_blocks,
        }
        if teacher is not None:
            expected["teacher"] = teacher
        wrong = [
            f"{name}: cache has {self.manifest.get(name)!r}, expected {value!r}"
            for name, value in expected.items()
            if self.manifest.get(name) != value
        ]
        if wrong:
            raise LogitCacheError(
                f"Logit cache {self.path} does not match this run ({'; '.join(wrong)}). Rewrite it "
                "with write_topk_cache for this teacher/tokenizer/data/seq_len, or point "
                "logit_cache at a matching cache."
            )

    def _shard(self, number: int) -> Any:
        if number not in self._handles:
            from safetensors import SafetensorError, safe_open

            shard = self.manifest["shards"][number]
            file = self.path / shard["file"]
            if self.verify_checksums and _sha256(file) != shard["sha256"]:
                raise LogitCacheError(
                    f"Logit cache shard {file} is corrupted (sha256 differs from the manifest): "
                    "rewrite the cache with write_topk_cache."
                )
            try:
                self._handles[number] = safe_open(str(file), framework="pt")
            except SafetensorError as error:
                raise LogitCacheError(f"Logit cache shard {file} cannot be read ({error}).") from None
        return self._handles[number]

    def read(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``topk_ids`` (S, k) int32 and ``topk_logprobs`` (S, k) float32 of block ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} outside the logit cache's {len(self)} blocks")
        number = int(np.searchsorted(self._first, index, side="right")) - 1
        row = index - int(self._first[number])
        handle = self._shard(number)
        ids = handle.get_slice("topk_ids")[row : row + 1][0]
        logprobs = handle.get_slice("topk_logprobs")[row : row + 1][0]
        # numpy converts float16 -> float32 in ~0.3 ms per block; torch's CPU kernel took ~15 ms here.
        return ids, torch.from_numpy(logprobs.numpy().astype(np.float32))
