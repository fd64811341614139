"""Teacher top-k logit cache: run the teacher once over all blocks, read its top-k in stage II.

One folder per split (``write_topk_cache(..., out_dir)`` writes exactly ``out_dir``; the data module's
``logit_cache`` takes such a folder, or a root holding ``train/`` and optionally ``val/``):

* ``shard-00000.safetensors`` ...: ``topk_ids`` int32 (n, S, k) and ``topk_logprobs`` float16 (n, S, k)
  for n consecutive blocks of the split (dataset order, not epoch order), best first. Log-probs are
  ``log_softmax`` over the FULL vocabulary computed in float32, then rounded to float16: relative error
  at most 2**-11 of the value (under 5e-4 for log-probs in [-1, 0], under 8e-3 at -20), and
  ``exp`` of them sums to at most 1 over the k tokens (up to that rounding).
* ``manifest.json``: teacher identity, tokenizer and data fingerprints, split, seq_len, k, vocab size,
  number of blocks, and per shard its file, first block, block count, size in bytes and sha256.

Writing is atomic and resumable: shards go to a sibling ``.<name>.partial/`` folder (each shard written
under a temporary name, renamed, then recorded in ``progress.json``); an interrupted write continues
from its last finished shard; the folder gets its final name only once the manifest is in it.
The reader refuses a cache whose manifest does not match the data module and detects truncated or
altered shards (size at open, sha256 on first use).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
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

    Args:
        teacher: called as ``teacher(input_ids=, position_ids=, segment_ids=)``, returning an object with
            ``.logits`` (B, S, V); it must keep documents apart using ``segment_ids``.
        datamodule: the data module whose blocks are scored (``prepare_data`` is run if needed).
        out_dir: the folder to write this split's cache to (e.g. ``runs/kd/logits/train``).
        k: how many top tokens to keep per position (the paper uses 256).
        batch_size: blocks per teacher forward.
        teacher_identity: a string naming the teacher (e.g. ``TeacherSpec.identity``), checked by readers.
        device: where the teacher runs.
        split: ``train``, ``val`` or ``heldout``.
        blocks_per_shard: blocks per shard file; None aims at about 256 MiB per shard.

    Returns:
        The finished cache folder ``out_dir``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if k < 1:
        raise LogitCacheError(f"k must be at least 1, got {k}.")
    datamodule.prepare_data()
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
    if (target / "manifest.json").is_file():
        existing = json.loads((target / "manifest.json").read_text())
        if {name: existing.get(name) for name in key} == key:
            return target
        raise LogitCacheError(
            f"{target} already holds a logit cache for another configuration: choose "
            "another out_dir or delete that folder."
        )
    shards = _resume_progress(partial, key)
    block_bytes = datamodule.seq_len * k * (4 + 2)
    per_shard = blocks_per_shard or max(1, _SHARD_BYTES // block_bytes)
    done = sum(shard["num_blocks"] for shard in shards)
    _check_disk(target.parent, (len(dataset) - done) * block_bytes)

    teacher.eval().to(device)
    bar = tqdm(total=len(dataset), initial=done, desc=f"teacher top-{k} ({split})", unit=" blocks")
    vocab_size = None
    while done < len(dataset):
        stop = min(done + per_shard, len(dataset))
        loader = DataLoader(torch.utils.data.Subset(dataset, range(done, stop)), batch_size=batch_size)
        parts_ids, parts_logprobs = [], []
        for batch in loader:
            with torch.inference_mode():
                logits = teacher(
                    **{name: batch[name].to(device) for name in ("input_ids", "position_ids", "segment_ids")}
                ).logits
                if k > logits.shape[-1]:
                    raise LogitCacheError(f"k={k} exceeds the teacher's vocabulary of {logits.shape[-1]}.")
                vocab_size = logits.shape[-1]
                ids, logprobs = topk_logprobs(logits, k)
                logprobs = logprobs.to(_LOGPROB_DTYPE)
            parts_ids.append(ids.cpu())
            parts_logprobs.append(logprobs.cpu())
            bar.update(len(batch["input_ids"]))
        name = f"shard-{len(shards):05d}.safetensors"
        tmp = partial / (name + ".tmp")
        save_file({"topk_ids": torch.cat(parts_ids), "topk_logprobs": torch.cat(parts_logprobs)}, str(tmp))
        os.replace(tmp, partial / name)
        shards.append(
            {
                "file": name,
                "first_block": done,
                "num_blocks": stop - done,
                "bytes": (partial / name).stat().st_size,
                "sha256": _sha256(partial / name),
            }
        )
        _write_json(partial / "progress.json", {"key": key, "shards": shards, "vocab_size": vocab_size})
        done = stop
    bar.close()
    vocab_size = vocab_size or json.loads((partial / "progress.json").read_text())["vocab_size"]
    _write_json(partial / "manifest.json", {**key, "vocab_size": vocab_size, "shards": shards})
    (partial / "progress.json").unlink()
    os.replace(partial, target)
    return target


def _resume_progress(partial: Path, key: dict) -> list[dict]:
    """Finished shards of an interrupted write with the same key (verified); else a fresh folder."""
    progress = partial / "progress.json"
    if progress.is_file():
        state = json.loads(progress.read_text())
        if state["key"] == key and all(
            (partial / s["file"]).is_file() and _sha256(partial / s["file"]) == s["sha256"]
            for s in state["shards"]
        ):
            return state["shards"]
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return []


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
