"""Write a balanced training mix of several data sources: one JSONL file per domain, equal token budgets.

``DistillDataModule`` mixes its sources in proportion to their size (train tokens with the SmolLM2
tokenizer: Shakespeare 1.5M, python-stdlib 8.6M, gcide 11.8M), so a generalist trained on
``[builtin:shakespeare, builtin:python-stdlib, builtin:gcide]`` would spend 7 % of its steps on prose.
This script draws documents of each source's **train split** (as ``split_of`` decides; held-out and
validation documents are never written) in a seeded random order until ``--tokens`` tokens of the
teacher's tokenizer are reached, cutting any document to at most ``--max-doc-tokens`` tokens, and
writes them as ``{"text": ...}`` rows to ``<out>/<domain>.jsonl``. Give the files as ``data.sources``.

    python runs/stage3/balanced_mix.py runs/stage3-cpu/mix prose=builtin:shakespeare \
        code=builtin:python-stdlib reference=builtin:gcide --tokens 200000
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lit_xdistill.data.corpora import split_of
from lit_xdistill.data.sources import resolve_source
from lit_xdistill.teachers import resolve_tokenizer


def write_domain(spec: str, path: Path, tokenizer, tokens: int, max_doc_tokens: int, seed: int) -> dict:
    """Write ``tokens`` tokens of ``spec``'s train-split documents to ``path``; returns counts."""
    documents = [d.text for d in resolve_source(spec).documents() if d.text and split_of(d) == "train"]
    random.Random(seed).shuffle(documents)
    written = rows = 0
    with path.open("w", encoding="utf-8") as out:
        for text in documents:
            if written >= tokens:
                break
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = min(len(ids), max_doc_tokens, tokens - written)
            if keep < len(ids):
                text = tokenizer.decode(ids[:keep])  # a prefix of a train document: still train text
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written, rows = written + keep, rows + 1
    return {"source": spec, "file": str(path), "tokens": written, "documents": rows, "pool": len(documents)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("domains", nargs="+", help="name=source, e.g. prose=builtin:shakespeare")
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens per domain")
    parser.add_argument("--max-doc-tokens", type=int, default=8192, help="cut longer documents")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = resolve_tokenizer(args.tokenizer)
    summary = []
    for item in args.domains:
        name, spec = item.split("=", 1)
        summary.append(write_domain(spec, args.out / f"{name}.jsonl", tokenizer, args.tokens,
                                    args.max_doc_tokens, args.seed))
        print(json.dumps(summary[-1]))
    (args.out / "mix.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
