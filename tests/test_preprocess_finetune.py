"""preprocessing.finetune_data on a tiny BEIR folder: exact tables, positives removed from negatives,
dead letters with file/line/reason, and identical bytes from a second, multi-threaded run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from common.shard_format import (
    FINETUNE_CORPUS_FILE, FINETUNE_CORPUS_SCHEMA, FINETUNE_GROUPS_FILE, FINETUNE_GROUPS_SCHEMA, FINETUNE_QUERIES_FILE,
    FINETUNE_QUERIES_SCHEMA, Manifest,
)
from common.tokenizer import load_tokenizer
from preprocessing import finetune_data
from preprocessing.records import InputError

CORPUS = [
    '{"_id": "d1", "title": "Alpha", "text": "First document text."}',
    '{"_id": "d2", "title": "", "text": "Second document with quite a few words so that it gets cut at the limit."}',
    '{"_id": "d3", "text": "No title here."}',
    "not json",  # 4: invalid_json
    '{"_id": "d5", "title": "t"}',  # 5: missing_field text
    '{"title": "x", "text": "no id"}',  # 6: missing_field _id
    '{"_id": "d4", "title": "Delta", "text": "Fourth."}',
    '{"_id": "d1", "title": "Again", "text": "A repeated id."}',  # 8: duplicate_id
]
QUERIES = [
    '{"_id": "q1", "text": "what is alpha"}',
    '{"_id": "q2", "text": "a second query that is rather long and must be cut"}',
    '{"_id": "q3", "text": "third"}',
    '{"_id": "q4", "text": ""}',  # 4: empty_document
]
QRELS = [
    "query-id\tcorpus-id\tscore",
    "q1\td1\t1",
    "q2\td2\t1",
    "q2\td3\t2",
    "q3\td4\t0",  # 5: no_positive
    "q9\td1\t1",  # 6: unknown_query
    "bad line",  # 7: invalid_qrel
    "q1\tdX\t1",  # 8: unknown_document (q1 keeps d1)
    "q2\td2\tx",  # 9: invalid_qrel
]
NEGATIVES = [
    '{"query_id": "q1", "negatives": ["d2", "d1", "d3", "d2", "dZ"]}',  # d1 is a positive, dZ unknown
    '{"query_id": "q2", "negatives": ["d1"]}',
    '{"query_id": "q1", "negatives": ["d4"]}',  # 3: duplicate_query
    '{"query_id": "q3"}',  # 4: invalid_negatives
    '{"query_id": "q7", "negatives": ["d1"]}',  # a query outside the split: not a group
]
EXPECTED_DEAD = [
    ("corpus.jsonl", 4, "invalid_json"), ("corpus.jsonl", 5, "missing_field"), ("corpus.jsonl", 6, "missing_field"),
    ("corpus.jsonl", 8, "duplicate_id"),
    ("negatives.jsonl", 1, "unknown_document"), ("negatives.jsonl", 3, "duplicate_query"),
    ("negatives.jsonl", 4, "invalid_negatives"), ("queries.jsonl", 4, "empty_document"),
    ("train.tsv", 5, "no_positive"),
    ("train.tsv", 6, "unknown_query"), ("train.tsv", 7, "invalid_qrel"), ("train.tsv", 8, "unknown_document"),
    ("train.tsv", 9, "invalid_qrel"),
]


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    files = {"corpus.jsonl": CORPUS, "queries.jsonl": QUERIES, "qrels/train.tsv": QRELS, "negatives.jsonl": NEGATIVES}
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def args(beir: Path, output: Path, *extra: str) -> list[str]:
    return ["--data_dir", str(beir), "--output_dir", str(output), "--negatives", str(beir / "negatives.jsonl"),
            "--query_max_length", "5", "--passage_max_length", "8", *extra]


@pytest.fixture(scope="module")
def result(beir, tmp_path_factory):
    output = tmp_path_factory.mktemp("ft") / "out"
    in_memory = ("--direct_running_mode", "in_memory", "--direct_num_workers", "1")
    return output, finetune_data.run(args(beir, output, *in_memory))


def read(path: Path, schema: pa.Schema) -> list[dict]:
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.schema.equals(schema)
    return table.to_pylist()


def test_tables_are_exact(result, minilm_path):
    output, manifest = result
    tokenizer = load_tokenizer(minilm_path)

    def ids(text: str, limit: int) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    corpus = read(output / FINETUNE_CORPUS_FILE, FINETUNE_CORPUS_SCHEMA)
    texts = {"d1": "Alpha First document text.", "d2": json.loads(CORPUS[1])["text"], "d3": "No title here.",
             "d4": "Delta Fourth."}
    assert corpus == [{"doc_id": d, "input_ids": ids(t, 8)} for d, t in texts.items()]
    assert len(corpus[1]["input_ids"]) == 8  # cut at --passage_max_length
    queries = read(output / FINETUNE_QUERIES_FILE, FINETUNE_QUERIES_SCHEMA)
    expected = [{"query_id": f"q{i + 1}", "input_ids": ids(json.loads(QUERIES[i])["text"], 5)} for i in range(3)]
    assert queries == expected
    groups = read(output / FINETUNE_GROUPS_FILE, FINETUNE_GROUPS_SCHEMA)
    assert groups == [
        {"query_id": "q1", "positive_ids": ["d1"], "negative_ids": ["d2", "d3"]},
        {"query_id": "q2", "positive_ids": ["d2", "d3"], "negative_ids": ["d1"]},
    ]
    assert manifest.kind == "finetune"
    assert [s.file for s in manifest.shards] == [FINETUNE_CORPUS_FILE, FINETUNE_QUERIES_FILE, FINETUNE_GROUPS_FILE]
    assert (manifest.counts["documents"], manifest.counts["queries"], manifest.counts["groups"]) == (4, 3, 2)
    assert manifest == Manifest.read(output)


def test_dead_letters(result):
    output, manifest = result
    letters = [json.loads(line) for line in (output / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()]
    assert [(d["file"], d["line"], d["reason"]) for d in letters] == EXPECTED_DEAD
    assert manifest.counts["dead_letter"] == len(EXPECTED_DEAD)


def test_command_line_multiprocess_run_is_byte_identical_and_errors_are_early(result, beir, tmp_path):
    """`python -m` in a worker process: also catches classes pickled by reference to `__main__`."""
    output, manifest = result
    command = [sys.executable, "-m", "preprocessing.finetune_data", *args(beir, tmp_path / "mt")]
    command += ["--direct_num_workers", "1"]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finetune_data done in" in done.stderr
    assert Manifest.read(tmp_path / "mt").shards == manifest.shards
    for name in (FINETUNE_CORPUS_FILE, FINETUNE_QUERIES_FILE, FINETUNE_GROUPS_FILE, "dead_letter/dead_letter.jsonl"):
        assert (tmp_path / "mt" / name).read_bytes() == (output / name).read_bytes()
    with pytest.raises(InputError, match="test.tsv"):
        finetune_data.run(args(beir, tmp_path / "none", "--split", "test"))
    assert not (tmp_path / "none").exists()
