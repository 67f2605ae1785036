"""A small real retrieval set that exists offline on every machine: the Python standard library's docstrings.

Why this text: it ships with the interpreter itself (no download, no package version drift beyond the
Python version), it is real English prose written by many authors, and it has a natural query/document
split. A docstring's first paragraph is its summary ("Return the number of items in the deque."); the
rest is the body. Queries are summaries, the relevant document is the body of the same docstring, and the
corpus is every body. Titles stay empty: a function's name would give the answer away. The two texts are
disjoint, so a model must match a short description to a longer explanation (like title -> abstract
retrieval), not copy strings. Pre-training sees only the corpus (the bodies), never a query, as in
BEIR-corpus pre-training ("DupMAE†" in the paper).

Determinism: files are walked in sorted order, docstrings in AST order, and the train/test split is a
hash of the query text, so the same Python version always gives the same set.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SKIPPED_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass
class DocstringCorpusConfig:
    min_summary_words: int = 4  # shorter summaries ("Constructor.") say too little to be a query
    max_summary_words: int = 30  # longer "summaries" are really bodies
    min_body_words: int = 20  # a document needs substance to be retrieved
    test_fraction: float = 0.25  # share of queries held out for evaluation (the rest trains)

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIPPED_PARTS & set(p.relative_to(root).parts))


def _docstrings(path: Path):
    """The docstrings of one module; unparsable files are skipped (old encodings)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _split(doc: str) -> tuple[str, str]:
    summary, _, body = doc.partition("\n\n")
    return " ".join(summary.split()), " ".join(body.split())


def build(output_dir: str | Path, config: DocstringCorpusConfig = DocstringCorpusConfig()) -> dict[str, int]:
    """Write a BEIR folder (corpus.jsonl, queries.jsonl, qrels/train.tsv, qrels/test.tsv); return counts."""
    pairs = []
    for path in _stdlib_files():
        for doc in _docstrings(path):
            summary, body = _split(doc)
            if (config.min_summary_words <= len(summary.split()) <= config.max_summary_words
                    and len(body.split()) >= config.min_body_words):
                pairs.append((summary, body))
    # A summary or body that occurs twice (copied docstrings) would make the relevance labels ambiguous.
    summary_counts = Counter(s for s, _ in pairs)
    body_counts = Counter(b for _, b in pairs)
    # A body that repeats its summary (doctest output, "see above") would turn retrieval into copying.
    pairs = [(s, b) for s, b in pairs if summary_counts[s] == 1 and body_counts[b] == 1 and s not in b]

    out = Path(output_dir)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "test": []}
    with open(out / "corpus.jsonl", "w") as corpus, open(out / "queries.jsonl", "w") as queries:
        for index, (summary, body) in enumerate(pairs):
            doc_id, query_id = f"d{index}", f"q{index}"
            corpus.write(json.dumps({"_id": doc_id, "title": "", "text": body}) + "\n")
            queries.write(json.dumps({"_id": query_id, "text": summary}) + "\n")
            bucket = int(hashlib.sha256(summary.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            splits["test" if bucket < config.test_fraction else "train"].append(f"{query_id}\t{doc_id}\t1")
    for split, rows in splits.items():
        (out / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    counts = {"documents": len(pairs), "train_queries": len(splits["train"]), "test_queries": len(splits["test"])}
    logger.info("docstring corpus in %s: %s", out, counts)
    return counts


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    build(sys.argv[1])
