"""The pure parts of preprocessing: sentence splitting, normalization, greedy packing, shard tables, record
parsing, worker-process settings, and the benchmark's second input."""
from __future__ import annotations

import gc
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from preprocessing.packing import bow_target, pack_document, pack_sentences, word_starts_of
from preprocessing.records import InputError, InputFile, expand_inputs, RawRecord, RecordError, RecordSpec, parse_record
from preprocessing.runner import make_pipeline, setup_worker_process
from preprocessing.shards import OutputDirError, blocks_table, prepare_output_dir
from preprocessing.text import normalize, split_sentences


def test_normalize_keeps_paragraphs_and_drops_control_characters():
    assert normalize("  a\u00a0 b\t\tc \r\n\r\n\r\n\n d\x00e\u200b  \n f ") == "a b c\n\nde\nf"
    assert normalize("Cafe\u0301") == "Caf\u00e9"  # NFC


@pytest.mark.parametrize(
    "text, sentences",
    [
        ('He said "Stop." Then he left! Did he? Yes.', ['He said "Stop."', "Then he left!", "Did he?", "Yes."]),
        ("Mr. Smith met Dr. Jones. J. R. R. Tolkien wrote e.g. This.",
         ["Mr. Smith met Dr. Jones.", "J. R. R. Tolkien wrote e.g. This."]),
        ("A heading\n\nA line\ncontinues here. 3 items follow.",
         ["A heading", "A line continues here.", "3 items follow."]),
        ("lower case after a period. stays together", ["lower case after a period. stays together"]),
        ("", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(normalize(text)) == sentences


def check_greedy_packing(lengths: list[int], spans: list[tuple[int, int]], limit: int) -> None:
    """Spans tile the document, none exceeds the limit, and each block ends only where the next sentence
    would not fit (or inside a sentence longer than the limit)."""
    total = sum(lengths)
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 < end - start <= limit for start, end in spans)
    boundaries = set(np.cumsum([0] + lengths).tolist())
    sentence_at = {}  # token position of a sentence start -> that sentence's length
    position = 0
    for length in lengths:
        sentence_at[position] = length
        position += length
    for start, end in spans[:-1]:
        if end in boundaries:
            next_length = next(sentence_at[p] for p in sorted(sentence_at) if p >= end and sentence_at[p] > 0)
            assert end - start + next_length > limit or end - start == limit
        else:  # inside a sentence: only when that sentence alone is longer than a block
            sentence_start = max(b for b in boundaries if b < end)
            assert end - start == limit and sentence_at[sentence_start] > limit


@pytest.mark.parametrize("seed", range(20))
def test_pack_sentences_is_greedy_and_loses_nothing(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 3, 7, 12, 30, 45]) for _ in range(rng.randint(1, 40))]
    if sum(lengths) == 0:
        lengths.append(5)
    limit = rng.choice([5, 16, 22])
    check_greedy_packing(lengths, pack_sentences(lengths, limit, 0.0, random.Random(0)), limit)


def test_short_seq_prob_draws_shorter_blocks():
    lengths = [1] * 2000
    full = pack_sentences(lengths, 50, 0.0, random.Random(0))
    short = pack_sentences(lengths, 50, 1.0, random.Random(0))
    assert all(end - start == 50 for start, end in full)
    assert len(short) > len(full) and all(3 <= end - start <= 50 for start, end in short[:-1])
    assert short == pack_sentences(lengths, 50, 1.0, random.Random(0))  # seeded


def test_word_starts_restart_at_every_sentence():
    word_ids = np.array([0, 0, 1, 0, 1, 1, 0, 0], dtype=np.int32)  # sentences of 3, 3 and 2 tokens
    expected = [True, False, True, True, True, False, True, False]
    assert word_starts_of(word_ids, np.array([0, 3, 6])).tolist() == expected


@pytest.mark.parametrize("weighting, short_seq_prob", [("uniform", 0.0), ("tf", 0.5)])
def test_shard_rows_equal_a_block_by_block_reference(weighting, short_seq_prob):
    """pack_document + blocks_table (whole documents, column by column) against slicing every block."""
    rng = np.random.default_rng(0)
    documents, reference = [], []
    for line in range(4):
        lengths = rng.integers(0, 30, size=rng.integers(1, 12)).tolist() + [5]
        ids = rng.integers(0, 50, size=sum(lengths)).astype(np.int32)
        starts = rng.random(len(ids)) < 0.7
        documents.append(pack_document((0, line), f"d{line}", ids, starts, lengths, 16, short_seq_prob,
                                       random.Random(line), weighting))
        for start, end in pack_sentences(lengths, 16, short_seq_prob, random.Random(line)):
            block_starts = starts[start:end].copy()
            block_starts[0] = True
            bow_ids, bow_weights = bow_target(ids[start:end], weighting)
            reference.append({"doc_id": f"d{line}", "input_ids": ids[start:end].tolist(),
                              "word_starts": block_starts.tolist(), "bow_ids": bow_ids.tolist(),
                              "bow_weights": bow_weights.tolist()})
    assert blocks_table(documents).to_pylist() == reference
    assert blocks_table([]).num_rows == 0


@pytest.mark.parametrize("weighting, vocabulary", [("uniform", 30522), ("tf", 30522), ("uniform", 250002)])
def test_packed_documents_pickle_compactly_and_come_back_equal(weighting, vocabulary):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocabulary, size=700).astype(np.int32)
    ids[:40] = 7  # repeated tokens: tf weights differ from uniform ones
    document = pack_document((2, 9), "d", ids, rng.random(700) < 0.6, [70] * 10, 64, 0.0, random.Random(0), weighting)
    data = pickle.dumps(document)
    back = pickle.loads(data)
    for name in ("block_lengths", "input_ids", "word_starts", "bow_lengths", "bow_ids", "bow_weights"):
        original, restored = getattr(document, name), getattr(back, name)
        assert restored.dtype == original.dtype and np.array_equal(restored, original), name
    assert (back.key, back.doc_id) == ((2, 9), "d")
    plain = sum(getattr(document, n).nbytes for n in ("input_ids", "word_starts", "bow_ids", "bow_weights"))
    assert len(data) < plain * (0.75 if vocabulary > 65535 or weighting == "tf" else 0.45)


def test_worker_process_settings_apply_only_outside_the_launcher():
    frozen, threads = gc.get_freeze_count(), os.environ.get("RAYON_NUM_THREADS")
    setup_worker_process(3, launcher_pid=os.getpid())  # an in-process run: nothing changes
    assert gc.get_freeze_count() == frozen and os.environ.get("RAYON_NUM_THREADS") == threads
    worker = ("import gc, os; from preprocessing.runner import setup_worker_process; "
              "setup_worker_process(3, launcher_pid=-1); "
              "print(gc.get_freeze_count() > 0, os.environ['RAYON_NUM_THREADS'], os.environ['TOKENIZERS_PARALLELISM'])")
    done = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "3", "true"]


def test_command_line_entry_freezes_the_heap_after_the_run():
    entry = ("import gc; from preprocessing.runner import main_entry; "
             "main_entry(lambda argv: print(gc.get_freeze_count() == 0), []); print(gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]


def test_local_runs_start_one_worker_per_core_by_default():
    from apache_beam.options.pipeline_options import DirectOptions

    def workers(args, threads):
        return make_pipeline(args, threads)._options.view_as(DirectOptions).direct_num_workers

    assert workers([], 1) == os.cpu_count()
    assert workers([], 2) == max(1, os.cpu_count() // 2)
    assert workers(["--direct_num_workers", "5"], 1) == 5


def test_benchmark_recut_input_keeps_every_paragraph_in_reverse_book_order(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from preprocess import RECUT_BYTES, write_recut

    books = [json.dumps({"text": "\n\n".join(f"Book {b} paragraph {p}. " * 40 for p in range(300))}).encode() + b"\n"
             for b in range(3)]
    write_recut(books, tmp_path / "recut.jsonl")
    documents = [json.loads(line)["text"] for line in (tmp_path / "recut.jsonl").read_text().splitlines()]
    expected = [p for book in reversed(books) for p in json.loads(book)["text"].split("\n\n")]
    assert [p for d in documents for p in d.split("\n\n")] == expected
    sizes = [len(d.encode()) for d in documents]
    assert len(documents) > 3 and max(sizes[:-1]) <= RECUT_BYTES[1] + 2000 and min(sizes[:-1]) >= RECUT_BYTES[0]


def record(payload, name="x.jsonl", fmt="jsonl") -> RawRecord:
    return RawRecord(InputFile(0, f"/data/{name}", name), 7, payload, fmt)


def test_parse_record_fields_ids_and_reasons():
    beir = RecordSpec(("title", "text"), ("title",), "_id", True)
    document = parse_record(record(b'{"_id": "d1", "title": "A  title", "text": "Body."}'), beir)
    assert (document.key, document.file, document.doc_id, document.text) == ((0, 7), "x.jsonl", "d1", "A title Body.")
    assert parse_record(record(b'{"_id": "d2", "text": "No title."}'), beir).text == "No title."
    parquet_row = record({"text": "parquet row"}, "y.parquet", "parquet")
    assert parse_record(parquet_row, RecordSpec(("text",))).doc_id == "y.parquet:7"
    assert parse_record(record(b"Plain\ntext.\n", "z.txt", "text"), RecordSpec(("text",))).text == "Plain\ntext."
    cases = [
        (b'{"title": "t", "text": "x"}', "missing_field"),  # no _id though required
        (b'{"_id": "d", "title": "t"}', "missing_field"),
        (b'{"_id": "d", "text": ["x"]}', "not_a_string"),
        (b'{"_id": "d", "text": "\\u200b "}', "empty_document"),
        (b"{bad", "invalid_json"),
        (b'"just a string"', "not_an_object"),
        (b'{"text": "\xc3"}', "invalid_utf8"),
    ]
    for payload, reason in cases:
        with pytest.raises(RecordError) as exc:
            parse_record(record(payload), beir)
        assert exc.value.reason == reason, payload


def bpe_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"])
    tokenizer.train_from_iterator(["unbelievably tokenized sentences, another one"] * 5, trainer)
    return tokenizer.to_str()


def test_encoder_word_starts_equal_word_ids_for_wordpiece_and_other_models(minilm_path):
    from tokenizers import Tokenizer

    from preprocessing.tokenize import BatchEncoder

    wordpiece = Tokenizer.from_file(f"{minilm_path}/tokenizer.json").to_str()
    docs = [["Unbelievably tokenized sentences, another one!", "One more."], ["x"]]
    for serialized, table in ((wordpiece, True), (bpe_tokenizer_json(), False)):
        encoder = BatchEncoder(serialized)
        assert (encoder.continuation is not None) == table  # the WordPiece lookup path, or word ids
        reference_tokenizer = Tokenizer.from_str(serialized)
        reference_tokenizer.no_padding()  # the packaged tokenizer.json pads and truncates to 128
        reference_tokenizer.no_truncation()
        all_starts = []
        for doc, encoded in zip(docs, encoder.encode_documents(docs)):
            ids, starts = [], []
            for sentence in doc:
                encoding = reference_tokenizer.encode(sentence, add_special_tokens=False)
                words = encoding.word_ids
                ids += encoding.ids
                starts += [j == 0 or words[j] != words[j - 1] for j in range(len(words))]
            assert encoded.input_ids.tolist() == ids and encoded.word_starts.tolist() == starts
            lengths = [len(reference_tokenizer.encode(s, add_special_tokens=False).ids) for s in doc]
            assert encoded.sentence_lengths == lengths
            all_starts += starts
        assert not all(all_starts)  # some word really has several pieces


def test_output_dir_check_and_overwrite_removes_only_our_files(tmp_path):
    ours = ["shard-00000-of-00003.arrow", "manifest.json", "dead_letter/dead_letter.jsonl", "corpus.arrow"]
    for name in [*ours, "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    with pytest.raises(OutputDirError, match="--overwrite"):
        prepare_output_dir(str(tmp_path), overwrite=False)
    prepare_output_dir(str(tmp_path), overwrite=True)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["notes.txt"]
    prepare_output_dir(str(tmp_path / "new"), overwrite=False)  # a missing folder is fine


def test_expand_inputs_sorts_names_and_refuses_bad_globs(tmp_path):
    for name in ("b/2.jsonl", "a/1.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    files = expand_inputs([str(tmp_path / "*" / "*.jsonl")])
    assert [(f.index, f.name) for f in files] == [(0, "a/1.jsonl"), (1, "b/2.jsonl")]
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.parquet")])


def test_num_shards_given_opens_no_input_else_every_input_is_measured(monkeypatch):
    """--num_shards fixes the count without content_bytes (which opens every compressed or Parquet input, remote
    ones at launch); without it every input is measured, with the columns read."""
    from preprocessing import pretrain_data
    from preprocessing.shards import estimate_num_shards

    files = [InputFile(i, f"gs://b/{i}.jsonl.gz", f"{i}.jsonl.gz", 10) for i in range(3)]
    measured = []

    def content_bytes(file, declared_format, columns):
        measured.append((file.path, declared_format, list(columns)))
        return 300 * 2**20

    monkeypatch.setattr(pretrain_data, "content_bytes", content_bytes)
    given = pretrain_data.PretrainDataConfig(input=["x"], output_dir="out", num_shards=5)
    assert pretrain_data.choose_num_shards(given, files) == 5 and measured == []
    sized = pretrain_data.PretrainDataConfig(input=["x"], output_dir="out", id_field="id", shard_size_mb=100)
    assert pretrain_data.choose_num_shards(sized, files) == estimate_num_shards(3 * 300 * 2**20, 100) > 1
    assert measured == [(f.path, "auto", ["text", "id"]) for f in files]


def test_list_offsets_past_int32_are_refused_not_wrapped():
    """2^31 values or more in one list column: an int32 running sum wraps and Arrow takes offsets that go
    backwards, so the shard would be written and read back with wrong rows. Refused with one line instead (the
    values are never touched: the lengths alone decide)."""
    import numpy as np
    import pyarrow as pa

    from preprocessing.shards import MAX_LIST_VALUES, ragged_list_array

    lengths = np.array([MAX_LIST_VALUES, MAX_LIST_VALUES, 2, 3], dtype=np.int64)  # int32 offsets: 0 M -2 0 3, taken
    with pytest.raises(ValueError, match=rf"^{2 * MAX_LIST_VALUES + 5} int32 values in one Arrow table: over "):
        ragged_list_array(lengths, np.arange(10, dtype=np.int32), pa.int32())
    small = ragged_list_array(np.array([2, 0, 1]), np.array([7, 8, 9], np.int32), pa.int32())
    assert small.to_pylist() == [[7, 8], [], [9]]
    with pytest.raises(pa.ArrowInvalid):  # lengths that do not add up to the values: caught before writing
        ragged_list_array(np.array([2, 2]), np.array([7, 8, 9], np.int32), pa.int32())


def _value_table(rows, schema):
    import pyarrow as pa

    return pa.Table.from_pylist([dict(zip(schema.names, row)) for row in rows], schema=schema)


_COLLECTED: list = []  # a transform's outputs: the runner pickles a DoFn, so it appends to this module's list


def _collect(element) -> None:
    _COLLECTED.append(element)


def _ordered_run(tmp_path, monkeypatch, lines_per_part, mode, elements, transform):
    """`transform(output)` alone on `elements`, on the DirectRunner in `mode` (2 threads when multi_threading);
    returns its one output, the output folder and the part files it left in the run's temporary folder."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from preprocessing import ordered_file
    from preprocessing.writes import OutputDir

    monkeypatch.setattr(ordered_file, "LINES_PER_PART", lines_per_part)
    output = OutputDir(str(tmp_path / "out"))
    _COLLECTED.clear()
    options = PipelineOptions(["--direct_running_mode", mode, "--direct_num_workers", "2" if "thread" in mode else "1"])
    with beam.Pipeline(options=options) as pipeline:
        _ = pipeline | beam.Create(elements) | transform(output) | beam.Map(_collect)
    parts = sorted(p for p in (tmp_path / "out" / "_temporary").rglob("*") if p.is_file() and "parts" in p.parts)
    return list(_COLLECTED), tmp_path / "out", parts


@pytest.mark.parametrize("seed,rows,lines_per_part,mode", [(0, 300, 1, "in_memory"), (1, 300, 7, "multi_threading"),
                                                           (2, 3000, 500, "in_memory"), (3, 0, 7, "in_memory")])
def test_dead_letters_are_one_plain_sort_of_shuffled_letters(tmp_path, monkeypatch, seed, rows, lines_per_part, mode):
    """WriteDeadLetters alone: letters in shuffled order (several per line, some repeated whole) come out as one
    sorted(...) of them, whatever the part size and threads; parts are written per (file, line range)."""
    from collections import Counter

    from preprocessing.records import DEAD_LETTER_FILE, DeadLetter, WriteDeadLetters

    rng = random.Random(seed)
    letters = [DeadLetter(f"f{rng.randrange(3)}.jsonl", rng.randrange(40), rng.choice(["unknown_document", "bad"]),
                          f"detail {rng.randrange(3)}", f"record {rng.randrange(3)} é") for _ in range(rows)]
    letters += letters[: rows // 10]  # whole repeats: tie on every field
    rng.shuffle(letters)
    got, out, parts = _ordered_run(tmp_path, monkeypatch, lines_per_part, mode, letters, WriteDeadLetters)
    reference = sorted(letters, key=lambda d: (d.file, d.line, d.reason, d.detail, d.record))
    assert (out / DEAD_LETTER_FILE).read_text("utf-8") == "".join(d.to_json() + "\n" for d in reference)
    assert got == [dict(Counter(d.reason for d in letters))]
    assert len(parts) == len({(d.file, d.line // lines_per_part) for d in letters})


@pytest.mark.parametrize("seed,rows,lines_per_part,mode", [(0, 2500, 300, "in_memory"), (1, 400, 3, "multi_threading"),
                                                           (2, 0, 3, "in_memory")])
def test_write_in_order_joins_arrow_parts_as_one_plain_sort(tmp_path, monkeypatch, seed, rows, lines_per_part, mode):
    """WriteInOrder alone with ArrowRows: shuffled (sort key, row) pairs give one Arrow file whose rows are
    sorted(...) of them (across parts and record batches), its row count, sha256 and summed stats."""
    import hashlib

    import pyarrow as pa

    from preprocessing.ordered_file import ArrowRows, WriteInOrder

    schema = pa.schema([("file", pa.string()), ("line", pa.int64()), ("value", pa.int64())])
    rng = random.Random(seed)
    rows_ = [(rng.choice("ab"), rng.randrange(rows or 1), rng.randrange(-5, 5)) for _ in range(rows)]
    rows_ += rows_[: rows // 10]
    rng.shuffle(rows_)
    elements = [((f, line, v), (f, line, v)) for f, line, v in rows_]
    def transform(output):
        return WriteInOrder(output, "values.arrow", ArrowRows(schema, _value_table),
                            lambda part: {"rows": len(part), "value": sum(r[2] for r in part)})

    got, out, parts = _ordered_run(tmp_path, monkeypatch, lines_per_part, mode, elements, transform)
    data = (out / "values.arrow").read_bytes()
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    assert table.schema == schema and [tuple(r.values()) for r in table.to_pylist()] == sorted(rows_)
    [(info, stats)] = got
    assert (info.file, info.rows, info.sha256) == ("values.arrow", len(rows_), hashlib.sha256(data).hexdigest())
    assert stats == {"rows": len(rows_), "value": sum(r[2] for r in rows_)}
    assert len(parts) == len({(f, line // lines_per_part) for f, line, _ in rows_})


@pytest.mark.parametrize("rows_per_batch", [1, 7, 1024])
def test_a_shard_written_batch_by_batch_equals_one_sorted_table(tmp_path, monkeypatch, rows_per_batch):
    """write_shard alone: shuffled documents, written a record batch at a time (batches of whole documents), give
    the file of blocks_table(sorted documents): same rows, stats and sha256, the same bytes in any input order."""
    import hashlib

    import pyarrow as pa

    from common.shard_format import shard_name
    from preprocessing import shards
    from preprocessing.writes import OutputDir

    monkeypatch.setattr(shards, "ROWS_PER_BATCH", rows_per_batch)
    rng = np.random.default_rng(rows_per_batch)
    documents = []
    for line in range(30):
        lengths = rng.integers(1, 20, size=rng.integers(1, 6)).tolist()
        ids = rng.integers(0, 50, size=sum(lengths)).astype(np.int32)
        documents.append(pack_document((line % 2, line), f"d{line}", ids, rng.random(len(ids)) < 0.7, lengths, 16, 0.3,
                                       random.Random(line), "uniform"))
    reference = blocks_table(sorted(documents, key=lambda d: d.key))
    files = []
    for order in range(2):
        random.Random(order).shuffle(documents)
        stats = shards.write_shard(OutputDir(str(tmp_path / f"out{order}")), 1, 3, iter(documents))
        files.append((tmp_path / f"out{order}" / shard_name(1, 3)).read_bytes())
        table = pa.ipc.open_file(pa.BufferReader(files[-1])).read_all()
        assert table.equals(reference)
        assert (stats.info.file, stats.info.rows, stats.info.sha256) == (
            shard_name(1, 3), reference.num_rows, hashlib.sha256(files[-1]).hexdigest())
        assert (stats.documents, stats.tokens) == (len(documents), sum(d.num_tokens for d in documents))
    assert files[0] == files[1]
    empty = shards.write_shard(OutputDir(str(tmp_path / "empty")), 0, 3, [])
    assert empty.info.rows == 0 and pa.ipc.open_file(tmp_path / "empty" / shard_name(0, 3)).read_all().num_rows == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_repeated_id_keeps_its_first_line_in_any_arrival_order(seed):
    """finetune_data.DropRepeatedIds alone: of one id's rows arriving shuffled, the lowest (file, line) is kept
    and every other is a duplicate_id dead letter at its own line."""
    from preprocessing.finetune_data import DropRepeatedIds

    lines = random.Random(seed).sample(range(1, 100), 6)
    rows = [((0, line), np.array([line], np.int32)) for line in lines]
    kept, *letters = DropRepeatedIds("corpus.jsonl").process(("d7", rows))
    assert kept[0] == (0, min(lines)) and kept[1][0] == "d7" and kept[1][1].tolist() == [min(lines)]
    assert sorted((t.value.file, t.value.line, t.value.reason, t.value.record) for t in letters) == [
        ("corpus.jsonl", line, "duplicate_id", "d7") for line in sorted(lines)[1:]]
