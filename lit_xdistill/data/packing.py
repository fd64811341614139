"""Tokenising documents and packing them into fixed-length blocks that keep document boundaries.

Tokenisation: each document becomes ``tokenizer(text)`` (with the tokenizer's own special tokens, e.g.
Llama-3's BOS) followed by one EOS token (not doubled when the tokenizer already ends with it); a chat
document is rendered with the tokenizer's chat template first. Documents are concatenated into one token
stream per split, stored as a flat array plus the offsets where documents start.

Packing: block ``b`` is stream positions ``[b*S, (b+1)*S)`` (the tail shorter than S is dropped). A
document may continue into the next block; inside a block each stretch of one document is a *segment*:

* ``segment_ids``: 0 for the first segment of the block, +1 at every segment start;
* ``position_ids``: 0 at every segment start (so also at position 0 of every block, where a continued
  document is seen without its beginning, exactly as the teacher and student see it), +1 per token;
* ``labels[t]``: the next stream token when it belongs to the same document, else -100. At the last
  position of a block it is the first token of the next block when the document continues there (the
  teacher's prediction at that position is as valid as any other), else -100.

So ``position_ids == 0`` exactly where ``segment_ids`` changes or the block starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpora import Document

__all__ = ["PackedBlocks", "TokenStreamWriter", "encode_documents", "tokenizer_fingerprint", "token_dtype"]

IGNORE_INDEX = -100


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything that decides token ids: the full tokenizer pipeline or vocab, special
    tokens and the chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps([str(t) for t in tokenizer.all_special_tokens]).encode())
    digest.update(f"eos={tokenizer.eos_token_id} bos={tokenizer.bos_token_id}".encode())
    digest.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (SmolLM2's 49k vocab: half the disk), else uint32 (Gemma's 262k)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def encode_documents(
    tokenizer: Any, documents: Iterable[Document], batch_size: int = 64
) -> Iterator[tuple[Document, list[int]]]:
    """Each document with its token ids (special tokens + trailing EOS), in input order; texts go
    through the fast tokenizer in batches."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token; packing needs one to separate documents.")
    batch: list[Document] = []

    def flush() -> Iterator[tuple[Document, list[int]]]:
        texts = [d.text or "" for d in batch if d.messages is None]
        encoded = iter(tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else [])
        for document in batch:
            if document.messages is None:
                ids = list(next(encoded))
            else:  # the rendered template already holds its special tokens: add none
                rendered = tokenizer.apply_chat_template(list(document.messages), tokenize=False)
                ids = tokenizer(rendered, add_special_tokens=False, verbose=False)["input_ids"]
            yield document, ids if ids and ids[-1] == eos else [*ids, eos]

    for document in documents:
        batch.append(document)
        if len(batch) >= batch_size:
            yield from flush()
            batch = []
    yield from flush()


class TokenStreamWriter:
    """Appends documents' token ids to ``<prefix>.tokens.bin`` and records document offsets.

    Args:
        directory: where the files go (a temporary folder that the caller renames when complete).
        split: the split name, used as file prefix.
        dtype: the on-disk token dtype (see :func:`token_dtype`).
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self._handle = (directory / f"{split}.tokens.bin").open("wb")
        self._lengths: list[int] = []

    def __enter__(self) -> TokenStreamWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()  # also on errors; a no-op after close()

    def add(self, ids: list[int]) -> None:
        """Append one document."""
        self._handle.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._lengths.append(len(ids))

    def close(self) -> dict[str, int]:
        """Flush, write the offsets, and return ``{"tokens": ..., "documents": ...}``."""
        self._handle.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        np.save(self.directory / f"{self.split}.doc_offsets.npy", offsets)
        return {"tokens": int(offsets[-1]), "documents": len(self._lengths)}


class PackedBlocks(Dataset):
    """Blocks of ``seq_len`` tokens of one split's token stream (see the module docstring).

    Args:
        directory: the token-cache folder holding ``<split>.tokens.bin`` and ``<split>.doc_offsets.npy``.
        split: ``train``, ``val`` or ``heldout``.
        seq_len: tokens per block.
        dtype: the stored token dtype.
        block_index: which stream blocks this dataset serves, in order (item i is block block_index[i]).
        topk: an opened top-k logit cache whose item i belongs to this dataset's item i, or None.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        seq_len: int,
        dtype: np.dtype,
        block_index: np.ndarray,
        topk: Any | None = None,
    ) -> None:
        self.directory, self.split, self.seq_len, self.dtype = Path(directory), split, seq_len, dtype
        self.block_index, self.topk = block_index, topk
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.block_index)

    def __getstate__(self) -> dict:
        # Worker processes re-open the memory maps instead of pickling them.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            tokens = np.memmap(self.directory / f"{self.split}.tokens.bin", dtype=self.dtype, mode="r")
            offsets = np.load(self.directory / f"{self.split}.doc_offsets.npy", mmap_mode="r")
            self._arrays = (tokens, offsets)
        return self._arrays

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, offsets = self._open()
        start = int(self.block_index[index]) * self.seq_len
        stop = min(start + self.seq_len + 1, len(tokens))  # one look-ahead token for the last label
        window = np.asarray(tokens[start:stop], dtype=np.int64)
        document = np.searchsorted(offsets, np.arange(start, stop), side="right") - 1
        S = self.seq_len
        segment_start = np.ones(S, dtype=bool)
        segment_start[1:] = document[1:S] != document[: S - 1]
        segment_ids = np.cumsum(segment_start) - 1
        starts = np.flatnonzero(segment_start)
        position_ids = np.arange(S) - starts[segment_ids]
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        same_document = document[1:] == document[:-1]  # length S (or S-1 at the stream's end)
        labels[: len(same_document)] = np.where(same_document, window[1:], IGNORE_INDEX)
        item = {
            "input_ids": torch.from_numpy(window[:S].copy()),
            "segment_ids": torch.from_numpy(segment_ids.astype(np.int32)),
            "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }
        if self.topk is not None:
            item["topk_ids"], item["topk_logprobs"] = self.topk.read(index)
        return item
