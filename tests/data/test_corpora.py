"""Built-in corpora and the hash split."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter

import pytest

from lit_xdistill.data import corpora
from lit_xdistill.data.corpora import BUILTIN_CORPORA, Document, split_of


def test_split_is_a_content_hash_with_the_documented_fractions():
    documents = [Document(text=f"document {i}") for i in range(20_000)]
    counts = Counter(split_of(d) for d in documents)
    assert abs(counts["val"] / 20_000 - 0.02) < 0.004 and abs(counts["heldout"] / 20_000 - 0.02) < 0.004
    assert split_of(Document(text="document 7")) == split_of(documents[7])  # same text, same split
    chat = Document(messages=({"role": "user", "content": "document 7"},))
    assert split_of(chat) in corpora.SPLITS


def test_shakespeare_one_document_per_act_modern_spelling_only():
    documents = list(BUILTIN_CORPORA["shakespeare"].documents())
    assert 150 < len(documents) < 250
    hamlet = [d.text for d in documents if d.text.startswith("HAMLET, PRINCE OF DENMARK")]
    assert len(hamlet) == 1  # act I carries the title and cast list
    assert not any("_gut_f" in d.text for d in documents)
    assert any(d.text.startswith("ACT II") for d in documents)
    assert {split_of(d) for d in documents} == {"train", "val", "heldout"}


def test_python_stdlib_yields_source_files():
    first = list(itertools.islice(BUILTIN_CORPORA["python-stdlib"].documents(), 20))
    assert len(first) == 20 and all(d.text.strip() for d in first)
    assert any("def " in d.text or "import " in d.text for d in first)


@pytest.mark.skipif(not corpora._GCIDE.joinpath("gcide.index").exists(), reason="dict-gcide not installed")
def test_gcide_entries_without_the_licence_preamble():
    first = [d.text for d in itertools.islice(BUILTIN_CORPORA["gcide"].documents(), 200)]
    assert not any("00-database" in t or "General Public License" in t for t in first)
    assert any("[1913 Webster]" in t for t in first)


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed")
def test_bible_one_document_per_chapter():
    first = next(BUILTIN_CORPORA["bible-kjv"].documents()).text
    assert first.startswith("Ge 1\n\n1 In the beginning God created the heaven and the earth.")
    assert "\n31 " in first and "2:1" not in first


def test_missing_debian_corpora_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "_GCIDE", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dict-gcide"):
        next(BUILTIN_CORPORA["gcide"].documents())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        next(BUILTIN_CORPORA["bible-kjv"].documents())
