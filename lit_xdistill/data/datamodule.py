"""`DistillDataModule`: packed, document-aware token blocks for every stage, resumable mid-epoch.

Flow: ``prepare_data`` resolves and checks the sources, the tokenizer and ``seq_len`` (cheap, so bad input
fails first), then tokenises every source once into a token cache keyed by the tokenizer and the
sources' content (written to a temporary folder and renamed, so a crash never leaves a cache that looks
complete). ``setup`` memory-maps the streams and, when configured, opens and validates the top-k logit
cache. Batches are described in :mod:`lit_xdistill.data.packing`.

Resume: the training loader implements ``state_dict``/``load_state_dict``; Lightning stores that state in
every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it on ``ckpt_path=...``, so
the epoch continues at the exact next block, in the same seeded order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .corpora import SPLITS, split_of
from .logit_cache import TopKLogitCache
from .packing import PackedBlocks, TokenStreamWriter, encode_documents, token_dtype, tokenizer_fingerprint
from .sources import Source, resolve_source

__all__ = ["BlockSampler", "DistillDataModule", "ResumableDataLoader"]

_TOKEN_CACHE_FORMAT = 1
_SELECTION_SEED = 0  # which blocks max_train_tokens / val_blocks keep: fixed, so caches survive seeds


class BlockSampler(DistributedSampler):
    """Seeded block order, sharded over ranks, that can start part-way into an epoch.

    A ``DistributedSampler`` subclass so that Lightning keeps it under DDP instead of replacing it.
    Epoch ``e`` visits ``randperm(n, seed + e)`` (or ``0..n-1`` without shuffling); rank ``r`` takes every
    ``world``-th block starting at ``r``; the ragged tail is dropped so all ranks see equally many.
    """

    def __init__(
        self, dataset: PackedBlocks, shuffle: bool, seed: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.skip = 0  # samples of this rank to skip at the next iteration (set on resume)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`BlockSampler` whose position within the epoch is checkpointed.

    Lightning's fit loop calls ``state_dict`` when it saves a checkpoint and ``load_state_dict`` before
    the first batch after a restore. Batches are counted as they are handed out; Lightning does not
    pre-fetch from loaders with a length, so the count equals the batches trained on.
    """

    def __init__(
        self,
        dataset: PackedBlocks,
        sampler: BlockSampler,
        batch_size: int,
        num_workers: int,
        data_fingerprint: str,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )
        self.data_fingerprint = data_fingerprint
        self._samples_done = 0

    def __iter__(self):
        self._samples_done = self.sampler.skip
        for batch in super().__iter__():
            self._samples_done += self.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Epoch, samples consumed on this rank, world size and the data fingerprint."""
        return {
            "epoch": self.sampler.epoch,
            "samples_done": self._samples_done,
            "world_size": self.sampler.num_replicas,
            "data_fingerprint": self.data_fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at its next unseen block (refuses different data)."""
        if state["data_fingerprint"] != self.data_fingerprint:
            raise ValueError(
                "The checkpoint was trained on different data (data fingerprint "
                f"{state['data_fingerprint'][:12]} != {self.data_fingerprint[:12]}): resume with the same "
                "tokenizer, sources, seq_len and max_train_tokens, or start a new run without ckpt_path."
            )
        # Blocks are dealt round-robin, so the samples consumed on all ranks are a prefix of the epoch's
        # order: convert it to this run's world size.
        consumed = state["samples_done"] * state["world_size"]
        if state["world_size"] != self.sampler.num_replicas and consumed % self.sampler.num_replicas:
            warnings.warn(
                "Resuming on a different number of devices: up to one block per device may be "
                "repeated or skipped at the resume point.",
                stacklevel=2,
            )
        skip = consumed // self.sampler.num_replicas
        if skip >= len(self.sampler):
            # Saved after the epoch's last batch: Lightning goes on with the next epoch on the
            # iterator it creates now, so that iterator must already be the next epoch's.
            self.sampler.set_epoch(state["epoch"] + 1)
            self.sampler.skip = 0
        else:
            self.sampler.set_epoch(state["epoch"])
            self.sampler.skip = skip


class DistillDataModule(L.LightningDataModule):
    """Packed token blocks with document boundaries (+ cached teacher top-k) for distillation.

    Args:
        tokenizer: teacher spec name or path whose tokenizer tokenises the data (resolved with
            ``lit_xdistill.teachers.resolve_tokenizer``), e.g. ``smollm2-135m-instruct``.
        sources: where the text comes from: ``builtin:<corpus>`` (shakespeare, python-stdlib, gcide,
            bible-kjv), local files/folders/globs (.txt/.md: one document per file; .jsonl with
            text or messages; .parquet with text), or ``hf:<dataset>[:<config>][:<split>]``.
        seq_len: tokens per training block.
        batch_size: blocks per batch (per device).
        val_blocks: at most this many validation blocks (a fixed subset of the val split).
        max_train_tokens: use at most this many training tokens (a fixed subset of whole blocks);
            None uses all.
        seed: seed of the per-epoch block order.
        num_workers: DataLoader worker processes.
        cache_dir: folder of the token cache (tokenised once per tokenizer + sources).
        logit_cache: a training-split cache written by ``write_topk_cache``, or a folder holding
            ``train/`` (and optionally ``val/``) caches; batches then carry ``topk_ids`` and
            ``topk_logprobs``.
        logit_cache_teacher: when set, the logit cache must have been written by this teacher identity.
        max_context: the teacher's context length; a larger ``seq_len`` is refused.
    """

    def __init__(
        self,
        tokenizer: str,
        sources: list[str],
        seq_len: int = 1024,
        batch_size: int = 8,
        val_blocks: int = 64,
        max_train_tokens: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str = ".cache/lit_xdistill/data",
        logit_cache: str | None = None,
        logit_cache_teacher: str | None = None,
        max_context: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if max_train_tokens is not None and max_train_tokens < seq_len:
            raise ValueError(
                f"max_train_tokens={max_train_tokens} is below one block (seq_len={seq_len}): "
                "raise it or leave it unset."
            )
        if not sources:
            raise ValueError("sources is empty: name at least one, e.g. builtin:shakespeare.")
        self.tokenizer_name, self.source_specs = tokenizer, list(sources)
        self.seq_len, self.batch_size, self.val_blocks = seq_len, batch_size, val_blocks
        self.max_train_tokens, self.seed, self.num_workers = max_train_tokens, seed, num_workers
        self.cache_dir, self.max_context = Path(cache_dir), max_context
        self.logit_cache, self.logit_cache_teacher = logit_cache, logit_cache_teacher
        self._tokenizer: Any = None
        self._sources: list[Source] | None = None
        self._token_dir: Path | None = None
        self.meta: dict[str, Any] = {}
        self.datasets: dict[str, PackedBlocks] = {}

    # --- checks and the token cache -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The resolved teacher tokenizer."""
        if self._tokenizer is None:
            from lit_xdistill.teachers import resolve_tokenizer

            self._tokenizer = resolve_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _check_inputs(self) -> list[Source]:
        """All cheap checks, before any tokenisation: sources exist, seq_len fits the context."""
        if self._sources is None:
            self._sources = [resolve_source(spec) for spec in self.source_specs]
            from lit_xdistill.teachers import TeacherSpec

            teacher_config = TeacherSpec(self.tokenizer_name).load_config().get_text_config()
            limits = {
                "max_context": self.max_context,
                "the tokenizer's model_max_length": getattr(self.tokenizer, "model_max_length", None),
                "the teacher's max_position_embeddings": getattr(
                    teacher_config, "max_position_embeddings", None
                ),
            }
            for what, limit in limits.items():
                if limit is not None and self.seq_len > limit:  # (no-limit tokenizers say ~1e30)
                    raise ValueError(
                        f"seq_len={self.seq_len} exceeds {what}={limit}: lower seq_len to at most {limit}."
                    )
        return self._sources

    @property
    def tokenizer_fingerprint(self) -> str:
        """Digest of the tokenizer (recorded in logit caches)."""
        return self._load_meta()["tokenizer_fingerprint"]

    def _token_cache_dir(self) -> Path:
        if self._token_dir is None:
            sources = self._check_inputs()
            key = hashlib.sha256(
                json.dumps(
                    {
                        "format": _TOKEN_CACHE_FORMAT,
                        "tokenizer": tokenizer_fingerprint(self.tokenizer),
                        "sources": [[s.spec, s.fingerprint()] for s in sources],
                    }
                ).encode()
            ).hexdigest()[:24]
            self._token_dir = self.cache_dir / f"tokens-{key}"
        return self._token_dir

    def prepare_data(self) -> None:
        """Check inputs, then tokenise all sources once into the token cache (skipped when cached)."""
        target = self._token_cache_dir()
        if not (target / "meta.json").is_file():
            self._build_token_cache(target)

    def _build_token_cache(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            meta = self._tokenise_into(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, target)  # atomic: the cache appears complete or not at all
            except OSError:
                if not (target / "meta.json").is_file():  # not a concurrent writer that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _tokenise_into(self, folder: Path) -> dict[str, Any]:
        """Tokenise every source into ``folder``'s split streams; returns the cache's meta."""
        from tqdm.auto import tqdm

        dtype = token_dtype(len(self.tokenizer))
        started, per_source = time.perf_counter(), []
        with ExitStack() as files:
            writers = {
                split: files.enter_context(TokenStreamWriter(folder, split, dtype)) for split in SPLITS
            }
            for source in self._check_inputs():
                counts = {split: 0 for split in SPLITS}
                documents = tqdm(source.documents(), desc=f"tokenising {source.spec}", unit=" docs")
                for document, ids in encode_documents(self.tokenizer, documents):
                    split = split_of(document)
                    writers[split].add(ids)
                    counts[split] += len(ids)
                if not any(counts.values()):
                    raise ValueError(f"Data source {source.spec!r} holds no documents with text.")
                per_source.append({"spec": source.spec, "tokens": counts})
            splits = {split: writer.close() for split, writer in writers.items()}
        seconds = time.perf_counter() - started
        return {
            "format": _TOKEN_CACHE_FORMAT,
            "tokenizer": self.tokenizer_name,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "vocab_size": len(self.tokenizer),
            "dtype": dtype.name,
            "splits": splits,
            "sources": per_source,
            "tokenize_seconds": round(seconds, 2),
            "tokens_per_second": round(sum(s["tokens"] for s in splits.values()) / max(seconds, 1e-9)),
        }

    def _load_meta(self) -> dict[str, Any]:
        if not self.meta:
            path = self._token_cache_dir() / "meta.json"
            if not path.is_file():
                raise FileNotFoundError(f"Token cache {path.parent} is missing: call prepare_data() first.")
            self.meta = json.loads(path.read_text())
        return self.meta

    # --- datasets ---------------------------------------------------------------------------------------
    def _block_limit(self, split: str) -> int | None:
        return {
            "train": None if self.max_train_tokens is None else self.max_train_tokens // self.seq_len,
            "val": self.val_blocks,
            "heldout": None,
        }[split]

    def data_fingerprint(self, split: str = "train") -> str:
        """Digest naming exactly the blocks of ``split`` (token cache, seq_len and block selection)."""
        return hashlib.sha256(
            json.dumps([self._token_cache_dir().name, split, self.seq_len, self._block_limit(split)]).encode()
        ).hexdigest()

    def dataset(self, split: str) -> PackedBlocks:
        """The blocks of ``split`` (``train``, ``val`` or ``heldout``), without top-k logits."""
        meta = self._load_meta()
        num_blocks = meta["splits"][split]["tokens"] // self.seq_len
        limit = self._block_limit(split)
        index = np.arange(num_blocks)
        if limit is not None and limit < num_blocks:
            index = np.sort(np.random.default_rng(_SELECTION_SEED).permutation(num_blocks)[:limit])
        return PackedBlocks(self._token_cache_dir(), split, self.seq_len, np.dtype(meta["dtype"]), index)

    def setup(self, stage: str | None = None) -> None:
        """Open the token cache (building it when running without a Trainer) and the logit cache."""
        if self.datasets:
            return
        if not (self._token_cache_dir() / "meta.json").is_file() and (
            self.trainer is None or self.trainer.world_size == 1
        ):
            self.prepare_data()
        for split in SPLITS:
            self.datasets[split] = self.dataset(split)
        train_tokens = self._load_meta()["splits"]["train"]["tokens"]
        if len(self.datasets["train"]) == 0:
            raise ValueError(
                f"The training split holds {train_tokens} tokens, fewer than one block of "
                f"seq_len={self.seq_len}: add data or lower seq_len."
            )
        if len(self.datasets["val"]) == 0:
            warnings.warn(
                f"The validation split holds fewer than seq_len={self.seq_len} tokens: validation "
                "is skipped. Add data or lower seq_len.",
                stacklevel=2,
            )
        if self.logit_cache is not None:
            self._attach_logit_cache(Path(self.logit_cache))

    def _attach_logit_cache(self, root: Path) -> None:
        """``root`` is one split's cache (used for train) or holds ``train/`` and optionally ``val/``."""
        folders = (
            {"train": root}
            if (root / "manifest.json").is_file()
            else {split: root / split for split in ("train", "val") if (root / split).is_dir()}
        )
        if "train" not in folders:
            raise FileNotFoundError(
                f"logit_cache={root} is neither a logit cache nor a folder with a train/ cache: write it "
                "with `lit-xdistill cache_logits` (lit_xdistill.data.write_topk_cache) first."
            )
        for split, folder in folders.items():
            cache = TopKLogitCache(folder)
            cache.validate(
                split=split,
                tokenizer_fingerprint=self.tokenizer_fingerprint,
                data_fingerprint=self.data_fingerprint(split),
                seq_len=self.seq_len,
                num_blocks=len(self.datasets[split]),
                teacher=self.logit_cache_teacher,
            )
            self.datasets[split].topk = cache

    # --- loaders -----------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled (seeded per epoch), drop-last, resumable mid-epoch."""
        world, rank = self._world()
        sampler = BlockSampler(
            self.datasets["train"], shuffle=True, seed=self.seed, num_replicas=world, rank=rank
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"Only {len(sampler)} training block(s) of seq_len={self.seq_len} per device, fewer than "
                f"batch_size={self.batch_size}: lower batch_size or seq_len, or add data."
            )
        return ResumableDataLoader(
            self.datasets["train"], sampler, self.batch_size, self.num_workers, self.data_fingerprint("train")
        )

    def _eval_loader(self, split: str) -> DataLoader:
        world, rank = self._world()
        sampler = BlockSampler(
            self.datasets[split], shuffle=False, seed=self.seed, num_replicas=world, rank=rank
        )
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """The validation blocks in fixed order."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The held-out blocks in fixed order (never trained on, never used for model selection)."""
        return self._eval_loader("heldout")
