"""Fine-tuning data: a BEIR folder (+ optional mined negatives) -> tokenized corpus, queries and groups.

    python -m preprocessing.finetune_data --data_dir data/scifact --output_dir ft/ --split train \
        --tokenizer bert-base-uncased --query_max_length 32 --passage_max_length 144 \
        [--negatives negatives.jsonl] [Beam pipeline options]

Writes common.shard_format's corpus.arrow (doc_id, input_ids of title + " " + text), queries.arrow
(query_id, input_ids) and groups.arrow (query_id, positive_ids with qrels score > 0, negative_ids: the
negatives file's ranked list minus the positives) beside manifest.json (kind "finetune") and
dead_letter/. The negatives file is JSONL {"query_id": str, "negatives": [doc ids, best first]}, as
finetune.mine_negatives writes it. Rows are sorted by their input line, so the bytes do not depend on the
runner. A qrels or negatives line naming an unknown query or document is a dead letter, not a crash later.
"""
from __future__ import annotations

import logging
import os
import time
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from common.shard_format import (
    FINETUNE_CORPUS_FILE, FINETUNE_CORPUS_SCHEMA, FINETUNE_GROUPS_FILE, FINETUNE_GROUPS_SCHEMA, FINETUNE_QUERIES_FILE,
    FINETUNE_QUERIES_SCHEMA, Manifest,
)
from common.tokenizer import load_tokenizer, vocab_hash
from preprocessing.records import (
    DEAD_LETTER_TAG, ParseRecords, ReadRecords, RecordError, RecordSpec, WriteDeadLetters, dead_letter,
    decode_line, expand_inputs, json_object,
)
from preprocessing.runner import (
    Progress, check_paths_reach_workers, log_summary, main_entry, make_pipeline, parse_config, setup_worker_process,
)
from preprocessing.ordered_file import ArrowRows, WriteInOrder
from preprocessing.shards import list_array, prepare_output_dir, read_manifest, write_manifest
from preprocessing.tokenize import BatchEncoder, read_staged_tokenizer, stage_tokenizer
from preprocessing.writes import OutputDir

logger = logging.getLogger(__name__)

GROUPS_TAG = "groups"  # BuildGroups' output of every group's key


@dataclass
class FinetuneDataConfig:
    data_dir: str = field(metadata={"help": "BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv"})
    output_dir: str = field(metadata={"help": "folder for the three Arrow files, manifest.json and dead_letter/"})
    split: str = field(default="train", metadata={"help": "qrels file qrels/SPLIT.tsv giving the positives"})
    negatives: str = field(default="", metadata={"help": "optional JSONL of ranked hard negatives per query"})
    tokenizer: str = field(
        default="default",
        metadata={"help": "HF fast tokenizer name or path; 'default' = packaged all-MiniLM-L6-v2"},
    )
    query_max_length: int = field(default=32, metadata={"help": "query tokens kept (no special tokens)"})
    passage_max_length: int = field(default=144, metadata={"help": "document tokens kept (no special tokens)"})
    tokenize_batch_size: int = field(default=1024, metadata={"help": "texts per tokenizer call"})
    tokenizer_threads: int = field(
        default=1,
        metadata={"help": "Rust tokenizer threads per Beam worker process (1: none; local runs start cores / this "
                          "workers: a third of the work is Python, which only more processes spread over the cores)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier run in output_dir"})

    def __post_init__(self):
        if min(self.query_max_length, self.passage_max_length, self.tokenize_batch_size, self.tokenizer_threads) < 1:
            raise ValueError(
                "--query_max_length, --passage_max_length, --tokenize_batch_size, --tokenizer_threads must be positive"
            )


class TokenizeTexts(beam.DoFn):
    """Document -> (sort key, id, input_ids), many texts per tokenizer call, cut at max_length tokens."""

    def __init__(self, tokenizer_path: str, max_length: int, batch_size: int, threads: int):
        self.tokenizer_path = tokenizer_path  # preprocessing.tokenize.stage_tokenizer's file
        self.max_length = max_length
        self.batch_size = batch_size
        self.threads, self.launcher_pid = threads, os.getpid()
        self.tokens = Metrics.counter("preprocessing", "tokens")

    def setup(self):
        setup_worker_process(self.threads, self.launcher_pid)
        self.encoder = BatchEncoder(read_staged_tokenizer(self.tokenizer_path), self.max_length)
        self.progress = Progress("finetune_data")

    def start_bundle(self):
        self.pending = []

    def process(self, document):
        self.pending.append(document)
        if len(self.pending) >= self.batch_size:
            yield from self._flush()

    def finish_bundle(self):
        for output in self._flush():
            yield beam.transforms.window.GlobalWindows.windowed_value(output)

    def _flush(self):
        pending, self.pending = self.pending, []
        if not pending:
            return
        encoded = self.encoder.encode_ids([d.text for d in pending])
        self.tokens.inc(sum(map(len, encoded)))
        self.progress.add(len(pending), sum(map(len, encoded)))
        for document, ids in zip(pending, encoded):
            yield document.key, document.doc_id, np.asarray(ids, dtype=np.int32)


class DropRepeatedIds(beam.DoFn):
    """(id, [(sort key, input_ids)]) -> (sort key, (id, input_ids)) of the id's first row; a repeated id is a
    dead letter. Grouped by id, so no worker needs every id of the corpus."""

    def __init__(self, source_name: str):
        self.source_name = source_name

    def process(self, keyed):
        row_id, rows = keyed
        (key, ids), *repeats = sorted(rows, key=lambda row: row[0])
        yield key, (row_id, ids)
        for repeat, _ in repeats:
            detail = f"id {row_id!r} appeared on an earlier line"
            yield dead_letter(self.source_name, repeat[1], "duplicate_id", detail, row_id)


def tokenized_table(rows: list, schema: pa.Schema) -> pa.Table:
    """(id, input_ids) rows -> the two-column table of corpus.arrow or queries.arrow."""
    ids = pa.array([row_id for row_id, _ in rows], type=pa.string())
    return pa.Table.from_arrays([ids, list_array([tokens for _, tokens in rows], pa.int32())], schema=schema)


def token_stats(rows: list) -> dict[str, int]:
    return {"tokens": sum(len(tokens) for _, tokens in rows)}


def parse_qrel(payload: bytes, line: int) -> tuple[str, str, int] | None:
    """(query_id, doc_id, score) of a qrels TSV line; None for the BEIR header; RecordError if malformed."""
    columns = decode_line(payload).rstrip("\r\n").split("\t")
    if line == 1 and columns[0] == "query-id":
        return None
    if len(columns) != 3 or not columns[0] or not columns[1]:
        raise RecordError("invalid_qrel", f"expected 3 tab-separated columns, got {len(columns)}")
    try:
        return columns[0], columns[1], int(columns[2])
    except ValueError:
        raise RecordError("invalid_qrel", f"score {columns[2]!r} is not an integer") from None


class ParseQrels(beam.DoFn):
    """qrels TSV line -> (query_id, (line, doc_id, score))."""

    def process(self, record):
        try:
            qrel = parse_qrel(record.payload, record.line)
        except RecordError as exc:
            yield dead_letter(record.file.name, record.line, exc.reason, str(exc), record.payload)
        else:
            if qrel is not None:
                yield qrel[0], (record.line, qrel[1], qrel[2])


class ParseNegatives(beam.DoFn):
    """negatives JSONL line -> (query_id, (line, [doc ids]))."""

    def process(self, record):
        try:
            value = json_object(record.payload)
            query_id, negatives = value.get("query_id"), value.get("negatives")
            valid_list = isinstance(negatives, list) and all(isinstance(d, str) for d in negatives)
            if not isinstance(query_id, str) or not valid_list:
                raise RecordError("invalid_negatives", 'expected {"query_id": str, "negatives": [str, ...]}')
            yield query_id, (record.line, negatives)
        except RecordError as exc:
            yield dead_letter(record.file.name, record.line, exc.reason, str(exc), record.payload)


class Ref(typing.NamedTuple):
    """One document a training group names, on its way to the corpus check."""

    group_line: int  # first qrels line of the query: the group's place in groups.arrow
    query_id: str
    role: str  # "positive" | "negative"
    rank: int  # position in the group's list
    line: int  # the qrels or negatives line naming the document, for dead letters


class BuildGroups(beam.DoFn):
    """CoGroupByKey by query -> (doc_id, Ref) for the corpus check, and on the "groups" output each group's
    (group line, query_id) key, so every group reaches FinishGroup even with no document left; unknown queries,
    repeated negatives lines and queries without a positive are dead letters."""

    def __init__(self, qrels_name: str, negatives_name: str):
        self.qrels_name, self.negatives_name = qrels_name, negatives_name

    def process(self, joined):
        query_id, grouped = joined
        qrels, negative_lines = sorted(grouped["qrels"]), sorted(grouped["negatives"])
        for line, _ in negative_lines[1:]:
            detail = f"second negatives line for {query_id!r}"
            yield dead_letter(self.negatives_name, line, "duplicate_query", detail, query_id)
        if qrels:  # negatives for a query outside this split are not part of the training set
            negatives = negative_lines[0] if negative_lines else (0, [])
            yield from self._group(query_id, qrels, negatives, bool(grouped["query"]))

    def _group(self, query_id, qrels, negative_line, known_query):
        first = qrels[0][0]
        positives: dict[str, int] = {}
        for line, doc, score in qrels:
            if score > 0:
                positives.setdefault(doc, line)
        if not known_query:
            detail = f"query {query_id!r} is not in queries.jsonl"
            yield dead_letter(self.qrels_name, first, "unknown_query", detail, query_id)
        elif not positives:
            detail = f"query {query_id!r} has no qrels score > 0"
            yield dead_letter(self.qrels_name, first, "no_positive", detail, query_id)
        else:
            line, ranked = negative_line
            negatives = [d for d in dict.fromkeys(ranked) if d not in positives]
            yield beam.pvalue.TaggedOutput(GROUPS_TAG, ((first, query_id), ("positive", -1, None)))
            for rank, (doc, doc_line) in enumerate(positives.items()):
                yield doc, Ref(first, query_id, "positive", rank, doc_line)
            for rank, doc in enumerate(negatives):
                yield doc, Ref(first, query_id, "negative", rank, line)


@beam.typehints.with_output_types(tuple[typing.Any, typing.Any])  # a KV for GroupRefs; dead letters are tagged
class CheckDocuments(beam.DoFn):
    """CoGroupByKey by doc_id -> ((group line, query_id), (role, rank, doc_id)) for the documents that exist;
    the others are dead letters."""

    def __init__(self, qrels_name: str, negatives_name: str):
        self.qrels_name, self.negatives_name = qrels_name, negatives_name

    def process(self, joined):
        doc_id, grouped = joined
        for ref in grouped["refs"]:
            if grouped["corpus"]:
                yield (ref.group_line, ref.query_id), (ref.role, ref.rank, doc_id)
            else:
                file = self.qrels_name if ref.role == "positive" else self.negatives_name
                detail = f"{ref.role} {doc_id!r} of query {ref.query_id!r} is not in the corpus"
                yield dead_letter(file, ref.line, "unknown_document", detail, doc_id)


class FinishGroup(beam.DoFn):
    """((group line, query_id), refs) -> ((qrels file, group line, query_id), groups.arrow row); a group left
    without a positive is a dead letter."""

    def __init__(self, qrels_name: str):
        self.qrels_name = qrels_name

    def process(self, keyed):
        (first, query_id), refs = keyed
        refs = sorted(r for r in refs if r[2] is not None)
        positives = [doc for role, _, doc in refs if role == "positive"]
        if not positives:
            detail = f"no positive of {query_id!r} is in the corpus"
            yield dead_letter(self.qrels_name, first, "no_positive", detail, query_id)
            return
        negatives = [doc for role, _, doc in refs if role == "negative"]
        yield (self.qrels_name, first, query_id), {"query_id": query_id, "positive_ids": positives,
                                                    "negative_ids": negatives}


def groups_table(rows: list, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def group_stats(rows: list) -> dict[str, int]:
    return {"doc_ids": sum(len(r["positive_ids"]) + len(r["negative_ids"]) for r in rows)}


def _tokenized_table(
    pipeline, name: str, file, spec: RecordSpec, max_length: int, cfg, tokenizer_path: str, schema, out_file: str,
    output: OutputDir,
):
    """Read, parse, tokenize and write one of corpus / queries; returns (file info, [dead letters], ids)."""
    parsed = (
        pipeline
        | f"{name}File" >> beam.Create([file])
        | f"Read{name}" >> beam.ParDo(ReadRecords("jsonl", ()))
        | f"Reshuffle{name}" >> beam.Reshuffle()
        | f"Parse{name}" >> beam.ParDo(ParseRecords(spec)).with_outputs(DEAD_LETTER_TAG, main="documents")
    )
    tokenize = TokenizeTexts(tokenizer_path, max_length, cfg.tokenize_batch_size, cfg.tokenizer_threads)
    rows = parsed.documents | f"Tokenize{name}" >> beam.ParDo(tokenize)
    unique = (
        rows
        | f"KeyById{name}" >> beam.MapTuple(lambda key, row_id, ids: (row_id, (key, ids)))
        | f"GroupById{name}" >> beam.GroupByKey()
        | f"DropRepeatedIds{name}" >> beam.ParDo(DropRepeatedIds(file.name)).with_outputs(DEAD_LETTER_TAG, main="rows")
    )
    info = unique.rows | f"Write{name}" >> WriteInOrder(output, out_file, ArrowRows(schema, tokenized_table), token_stats)
    ids = rows | f"{name}Ids" >> beam.MapTuple(lambda key, row_id, ids: (row_id, True))
    return info, [parsed[DEAD_LETTER_TAG], unique[DEAD_LETTER_TAG]], ids


def _lines(pipeline, name: str, file, parser: beam.DoFn):
    return (
        pipeline
        | f"{name}File" >> beam.Create([file])
        | f"Read{name}" >> beam.ParDo(ReadRecords("jsonl", ()))
        | f"Parse{name}" >> beam.ParDo(parser).with_outputs(DEAD_LETTER_TAG, main="rows")
    )


def build_pipeline(
    pipeline: beam.Pipeline, cfg: FinetuneDataConfig, files: dict, tokenizer, pipeline_args, output: OutputDir
) -> None:
    tokenizer_path = stage_tokenizer(tokenizer, output)
    corpus_info, corpus_dead, corpus_ids = _tokenized_table(
        pipeline, "Corpus", files["corpus"], RecordSpec(("title", "text"), ("title",), "_id", True),
        cfg.passage_max_length, cfg, tokenizer_path, FINETUNE_CORPUS_SCHEMA, FINETUNE_CORPUS_FILE, output,
    )
    query_info, query_dead, query_ids = _tokenized_table(
        pipeline, "Queries", files["queries"], RecordSpec(("text",), (), "_id", True), cfg.query_max_length,
        cfg, tokenizer_path, FINETUNE_QUERIES_SCHEMA, FINETUNE_QUERIES_FILE, output,
    )
    qrels = _lines(pipeline, "Qrels", files["qrels"], ParseQrels())
    dead = [*corpus_dead, *query_dead, qrels[DEAD_LETTER_TAG]]
    negatives_name = files["negatives"].name if "negatives" in files else ""
    if "negatives" in files:
        negatives = _lines(pipeline, "Negatives", files["negatives"], ParseNegatives())
        dead.append(negatives[DEAD_LETTER_TAG])
        negative_rows = negatives.rows
    else:
        negative_rows = pipeline | "NoNegatives" >> beam.Create([])
    refs = (
        {"qrels": qrels.rows, "negatives": negative_rows, "query": query_ids}
        | "JoinByQuery" >> beam.CoGroupByKey()
        | "BuildGroups"
        >> beam.ParDo(BuildGroups(files["qrels"].name, negatives_name)).with_outputs(
            DEAD_LETTER_TAG, GROUPS_TAG, main="refs"
        )
    )
    checked = (
        {"refs": refs.refs, "corpus": corpus_ids}
        | "JoinByDocument" >> beam.CoGroupByKey()
        | "CheckDocuments"
        >> beam.ParDo(CheckDocuments(files["qrels"].name, negatives_name)).with_outputs(DEAD_LETTER_TAG, main="refs")
    )
    groups = (
        (refs[GROUPS_TAG], checked.refs)
        | "FlattenRefs" >> beam.Flatten()
        | "GroupRefs" >> beam.GroupByKey()
        | "FinishGroups" >> beam.ParDo(FinishGroup(files["qrels"].name)).with_outputs(DEAD_LETTER_TAG, main="rows")
    )
    groups_info = groups.rows | "WriteGroups" >> WriteInOrder(
        output, FINETUNE_GROUPS_FILE, ArrowRows(FINETUNE_GROUPS_SCHEMA, groups_table), group_stats
    )
    dead += [refs[DEAD_LETTER_TAG], checked[DEAD_LETTER_TAG], groups[DEAD_LETTER_TAG]]
    reasons = tuple(dead) | "FlattenDeadLetters" >> beam.Flatten() | "WriteDeadLetters" >> WriteDeadLetters(output)
    manifest_fields = {
        "tokenizer": cfg.tokenizer, "vocab_hash": vocab_hash(tokenizer), "max_seq_length": cfg.passage_max_length,
        "options": {**asdict(cfg), "pipeline_args": list(pipeline_args)},
    }
    _ = (
        (corpus_info, query_info, groups_info)
        | "FlattenInfos" >> beam.Flatten()
        | "CollectInfos" >> beam.combiners.ToList()
        | "WriteManifest" >> beam.Map(_write_manifest, output, manifest_fields, beam.pvalue.AsSingleton(reasons))
    )


def _write_manifest(infos, output: OutputDir, manifest_fields: dict, reasons: dict) -> None:
    rows = {info.file: (info, stats) for info, stats in infos}
    corpus, queries, groups = (rows[f] for f in (FINETUNE_CORPUS_FILE, FINETUNE_QUERIES_FILE, FINETUNE_GROUPS_FILE))
    counts = {
        "documents": corpus[0].rows, "queries": queries[0].rows, "groups": groups[0].rows,
        "tokens": corpus[1]["tokens"] + queries[1]["tokens"], "group_doc_ids": groups[1]["doc_ids"],
        "dead_letter": sum(reasons.values()),
    }
    extra = {
        "query_max_length": manifest_fields["options"]["query_max_length"],
        "dead_letter_reasons": dict(sorted(reasons.items())),
    }
    shards = [corpus[0], queries[0], groups[0]]
    write_manifest(output, Manifest(kind="finetune", shards=shards, counts=counts, extra=extra, **manifest_fields))


def input_files(cfg: FinetuneDataConfig) -> dict:
    """The BEIR files (and negatives), checked readable before any work."""
    paths = {
        "corpus": FileSystems.join(cfg.data_dir, "corpus.jsonl"),
        "queries": FileSystems.join(cfg.data_dir, "queries.jsonl"),
        "qrels": FileSystems.join(cfg.data_dir, "qrels", f"{cfg.split}.tsv"),
    }
    if cfg.negatives:
        paths["negatives"] = cfg.negatives
    return {role: expand_inputs([path])[0] for role, path in paths.items()}


def run(argv: Sequence[str] | None = None) -> Manifest:
    """Parse flags, check inputs, tokenizer and output folder (one-line errors), run the job, return its manifest."""
    cfg, pipeline_args = parse_config(FinetuneDataConfig, argv, __doc__.split("\n")[0])
    paths = [("output_dir", cfg.output_dir), ("data_dir", cfg.data_dir), ("negatives", cfg.negatives)]
    check_paths_reach_workers(pipeline_args, paths)
    files = input_files(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer)
    prepare_output_dir(cfg.output_dir, cfg.overwrite)
    output = OutputDir(cfg.output_dir)
    start = time.monotonic()
    with make_pipeline(pipeline_args, cfg.tokenizer_threads) as pipeline:
        build_pipeline(pipeline, cfg, files, tokenizer, pipeline_args, output)
    output.remove_temporary()
    manifest = read_manifest(cfg.output_dir)
    log_summary("finetune_data", manifest.counts, time.monotonic() - start)
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    main_entry(run, argv)


if __name__ == "__main__":  # run the imported module, so pickled classes are found by name on workers
    from preprocessing.finetune_data import main as module_main

    module_main()
