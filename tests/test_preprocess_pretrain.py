"""preprocessing.pretrain_data end to end: schema, targets against plain recomputation, packing, dead
letters, determinism across runners (one multi-process DirectRunner run), one-line errors."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.shard_format import PRETRAIN_SCHEMA, Manifest
from common.tokenizer import TokenizerError, load_tokenizer
from preprocessing import pretrain_data
from preprocessing.records import InputError
from preprocessing.shards import OutputDirError
from preprocessing.text import normalize, split_sentences

MAX_SEQ_LENGTH = 24  # blocks of at most 22 tokens: several blocks per document, long sentences split
LONG_SENTENCE = " ".join(f"word{i} and another thing" for i in range(30))  # no boundary, > 22 tokens
GOOD_JSONL = {
    1: {"id": "doc-a", "text": "Mr. Smith went to Washington. He met Dr. Jones there! " * 4 + LONG_SENTENCE + ". End."},
    2: {"text": "Short one. Two."},
    9: {"text": "Ünïcödé café — naïve résumé.\n\nA paragraph with no period\nSo this starts a sentence? Yes."},
}
BAD_JSONL = {  # line -> (raw bytes, reason)
    3: (b"not json at all", "invalid_json"),
    4: (b'{"title": "no text here"}', "missing_field"),
    5: (b'{"text": "   \\n "}', "empty_document"),
    6: (b'{"text": "caf\xe9"}', "invalid_utf8"),
    7: (b"[1, 2]", "not_an_object"),
    8: (b'{"text": 7}', "not_a_string"),
    10: (b'{"text": "\\u0301\\u200d"}', "no_tokens"),
}
TEXT_DOCS = ["First line of a text document.\nIt goes on. And on.", "A second document.\nWith two lines."]
PARQUET_ROWS = [{"id": "p1", "text": "Parquet row one. Has two sentences."}, {"id": "p2", "text": "Row two here."}]


def expected_documents() -> dict[str, str]:
    """doc_id -> raw text, for every good record of the inputs."""
    docs = {row.get("id", f"a.jsonl:{line}"): row["text"] for line, row in GOOD_JSONL.items()}
    docs.update({"b.txt:1": TEXT_DOCS[0], "b.txt:4": TEXT_DOCS[1]})
    docs.update({row["id"]: row["text"] for row in PARQUET_ROWS})
    return docs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    lines = {line: json.dumps(row).encode() for line, row in GOOD_JSONL.items()}
    lines.update({line: raw for line, (raw, _) in BAD_JSONL.items()})
    (folder / "a.jsonl").write_bytes(b"".join(lines[i] + b"\n" for i in sorted(lines)))
    (folder / "b.txt").write_text("\n\n".join(TEXT_DOCS) + "\n")
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), folder / "c.parquet")
    return folder


def args(inputs: Path, output: Path, *extra: str) -> list[str]:
    return ["--input", str(inputs / "*.jsonl"), str(inputs / "b.txt"), str(inputs / "c.parquet"),
            "--output_dir", str(output), "--max_seq_length", str(MAX_SEQ_LENGTH), "--id_field", "id",
            "--num_shards", "3", "--short_seq_prob", "0.3", *extra]


@pytest.fixture(scope="module")
def run_in_memory(inputs, tmp_path_factory) -> tuple[Path, Manifest]:
    output = tmp_path_factory.mktemp("out") / "shards"
    in_memory = ("--direct_running_mode", "in_memory", "--direct_num_workers", "1")
    return output, pretrain_data.run(args(inputs, output, *in_memory))


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


def read_rows(output: Path, manifest: Manifest) -> list[dict]:
    rows = []
    for shard in manifest.shards:
        with pa.memory_map(str(output / shard.file)) as source:
            table = pa.ipc.open_file(source).read_all()
        assert table.schema.equals(PRETRAIN_SCHEMA)
        rows += table.to_pylist()
    return rows


def blocks_by_document(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:  # a document's blocks are consecutive rows of one shard, in order
        grouped.setdefault(row["doc_id"], []).append(row)
    return grouped


def test_schema_and_manifest(run_in_memory):
    output, manifest = run_in_memory
    assert manifest == Manifest.read(output)
    assert manifest.kind == "pretrain" and manifest.max_seq_length == MAX_SEQ_LENGTH
    assert [s.file for s in manifest.shards] == [f"shard-0000{i}-of-00003.arrow" for i in range(3)]
    for shard in manifest.shards:
        assert hashlib.sha256((output / shard.file).read_bytes()).hexdigest() == shard.sha256
    rows = read_rows(output, manifest)
    assert sum(s.rows for s in manifest.shards) == len(rows) == manifest.counts["blocks"] > 0
    assert manifest.counts["documents"] == len(expected_documents())
    assert manifest.counts["tokens"] == sum(len(r["input_ids"]) for r in rows)
    assert manifest.counts["dead_letter"] == len(BAD_JSONL)


def test_blocks_hold_exactly_the_documents_tokens(run_in_memory, tokenizer):
    output, manifest = run_in_memory
    grouped = blocks_by_document(read_rows(output, manifest))
    assert set(grouped) == set(expected_documents())
    for doc_id, text in expected_documents().items():
        sentences = split_sentences(normalize(text))
        reference = [t for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"] for t in ids]
        assert [t for row in grouped[doc_id] for t in row["input_ids"]] == reference, doc_id
        assert all(0 < len(row["input_ids"]) <= MAX_SEQ_LENGTH - 2 for row in grouped[doc_id])
    assert len(grouped["doc-a"]) > 3  # packing really happened, and the long sentence was split


def test_word_starts_equal_tokenizer_word_ids(run_in_memory, tokenizer):
    output, manifest = run_in_memory
    for doc_id, blocks in blocks_by_document(read_rows(output, manifest)).items():
        encoded = tokenizer(split_sentences(normalize(expected_documents()[doc_id])), add_special_tokens=False)
        reference = []
        for i in range(len(encoded["input_ids"])):
            words = encoded.word_ids(i)
            reference += [j == 0 or words[j] != words[j - 1] for j in range(len(words))]
        position = 0
        for block in blocks:  # a block's first token always starts a (possibly partial) word
            reference[position] = True
            position += len(block["input_ids"])
        assert [s for block in blocks for s in block["word_starts"]] == reference, doc_id


def test_bow_targets_equal_recomputation(run_in_memory):
    output, manifest = run_in_memory
    for row in read_rows(output, manifest):
        unique = sorted(set(row["input_ids"]))
        assert row["bow_ids"] == unique
        assert row["bow_weights"] == pytest.approx([1.0 / len(unique)] * len(unique), rel=1e-6)
        assert sum(row["bow_weights"]) == pytest.approx(1.0, abs=1e-5)


def test_dead_letters_name_file_line_and_reason(run_in_memory):
    output, manifest = run_in_memory
    letters = [json.loads(line) for line in (output / "dead_letter" / "dead_letter.jsonl").read_text().splitlines()]
    expected = [("a.jsonl", line, reason) for line, (_, reason) in sorted(BAD_JSONL.items())]
    assert [(d["file"], d["line"], d["reason"]) for d in letters] == expected
    assert letters[0]["record"] == "not json at all"
    assert manifest.extra["dead_letter_reasons"] == dict(Counter(reason for _, reason in BAD_JSONL.values()))


def test_multiprocess_run_gives_identical_bytes(run_in_memory, inputs, tmp_path):
    output, manifest = run_in_memory
    multi_processing = ("--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    again = pretrain_data.run(args(inputs, tmp_path / "mp", *multi_processing))
    assert again.shards == manifest.shards and again.counts == manifest.counts
    for shard in manifest.shards:
        assert (tmp_path / "mp" / shard.file).read_bytes() == (output / shard.file).read_bytes()
    dead_letter = Path("dead_letter") / "dead_letter.jsonl"
    assert (tmp_path / "mp" / dead_letter).read_bytes() == (output / dead_letter).read_bytes()


def test_shards_from_texts_with_tf_weighting(tmp_path):
    texts = ["the cat sat on the mat. the end.", "one two two three three three."]
    manifest = pretrain_data.shards_from_texts(texts, tmp_path / "tf", "--bow_weighting", "tf", "--max_seq_length", "8")
    rows = read_rows(tmp_path / "tf", manifest)
    assert manifest.counts["documents"] == 2 and manifest.counts["dead_letter"] == 0
    for row in rows:
        counts = Counter(row["input_ids"])
        assert row["bow_ids"] == sorted(counts)
        expected = [counts[t] / len(row["input_ids"]) for t in sorted(counts)]
        assert row["bow_weights"] == pytest.approx(expected, rel=1e-6)


def test_shards_no_document_went_to_are_written_empty(tmp_path):
    manifest = pretrain_data.shards_from_texts(["A single short document."], tmp_path / "few", "--num_shards", "3")
    assert [s.file for s in manifest.shards] == [f"shard-0000{i}-of-00003.arrow" for i in range(3)]
    assert sorted(s.rows for s in manifest.shards) == [0, 0, 1] and manifest.counts["blocks"] == 1
    for shard in manifest.shards:
        assert hashlib.sha256((tmp_path / "few" / shard.file).read_bytes()).hexdigest() == shard.sha256
    assert len(read_rows(tmp_path / "few", manifest)) == 1


def test_errors_before_any_work(inputs, tmp_path, capsys):
    output = tmp_path / "never"
    with pytest.raises(TokenizerError):
        pretrain_data.run(args(inputs, output, "--tokenizer", str(tmp_path / "no-such-tokenizer")))
    with pytest.raises(InputError, match="matches no file"):
        pretrain_data.run(["--input", str(tmp_path / "*.missing"), "--output_dir", str(output)])
    assert not output.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        pretrain_data.main(args(inputs, tmp_path / "full"))
    assert isinstance(exc.value.code, str) and "\n" not in exc.value.code and "--overwrite" in exc.value.code
    with pytest.raises(OutputDirError):
        pretrain_data.run(args(inputs, tmp_path / "full"))
