"""Pre-training data: corpora -> packed token blocks with whole-word starts and bag-of-words targets.

    python -m preprocessing.pretrain_data --input 'data/*.jsonl' --output_dir shards/ \
        --tokenizer bert-base-uncased --max_seq_length 512 [Beam pipeline options]

Read (JSONL, plain text, Parquet; any Beam filesystem) -> normalize -> split sentences -> tokenize in
batches -> pack consecutive sentences of a document into blocks of at most max_seq_length - 2 tokens ->
BoW target per block -> Arrow IPC shards + manifest.json (common.shard_format). Without --runner it runs
on the DirectRunner in multi-processing mode over all local cores (cores / --tokenizer_threads worker
processes, each tokenizing with --tokenizer_threads Rust threads; by default one process per core);
every Beam option passes through. Output bytes do not depend on the runner: each document is keyed by
(file, line), goes to a shard by a hash of that key with all its blocks in one element, and each shard
is sorted by it before writing.
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from common.shard_format import Manifest, shard_name
from common.tokenizer import load_tokenizer, vocab_hash
from preprocessing.packing import BOW_WEIGHTINGS, pack_document
from preprocessing.records import (
    DEAD_LETTER_TAG, INPUT_FORMATS, ParseRecords, ReadRecords, RecordSpec, WriteDeadLetters, content_bytes, dead_letter,
    expand_inputs,
)
from preprocessing.runner import (
    Progress, check_paths_reach_workers, log_summary, main_entry, make_pipeline, parse_config, setup_worker_process,
)
from preprocessing.shards import (
    WriteShard, estimate_num_shards, prepare_output_dir, read_manifest, shard_of, write_manifest, write_shard,
)
from preprocessing.text import split_sentences
from preprocessing.tokenize import BatchEncoder, read_staged_tokenizer, stage_tokenizer
from preprocessing.writes import OutputDir

logger = logging.getLogger(__name__)


@dataclass
class PretrainDataConfig:
    input: list[str] = field(metadata={"help": "input files or globs (local, gs://, s3://, hdfs://)"})
    output_dir: str = field(metadata={"help": "folder for shards, manifest.json and dead_letter/"})
    tokenizer: str = field(
        default="default",
        metadata={"help": "HF fast tokenizer name or path; 'default' = packaged all-MiniLM-L6-v2"},
    )
    max_seq_length: int = field(
        default=512,
        metadata={"help": "model sequence length; blocks hold at most this - 2 tokens"},
    )
    short_seq_prob: float = field(default=0.0, metadata={"help": "probability of a random shorter block target (BERT)"})
    text_fields: list[str] = field(
        default_factory=lambda: ["text"],
        metadata={"help": "record fields joined with ' ' into the document (e.g. title text)"},
    )
    id_field: str = field(default="", metadata={"help": "record field holding the document id (default: file:line)"})
    input_format: str = field(
        default="auto",
        metadata={"help": "by extension when auto: .parquet, .txt, else JSONL", "choices": INPUT_FORMATS},
    )
    bow_weighting: str = field(
        default="uniform",
        metadata={"help": "BoW target: uniform over unique tokens (paper) or tf", "choices": BOW_WEIGHTINGS},
    )
    shard_size_mb: float = field(
        default=256.0,
        metadata={"help": "approximate shard size; sets the shard count from the input size"},
    )
    num_shards: int = field(default=0, metadata={"help": "exact shard count (0: from --shard_size_mb)"})
    tokenize_batch_sentences: int = field(default=4096, metadata={"help": "sentences per tokenizer call"})
    tokenizer_threads: int = field(
        default=1,
        metadata={"help": "Rust tokenizer threads per Beam worker process (1: none; local runs start cores / this "
                          "workers: a third of the work is Python, which only more processes spread over the cores)"},
    )
    seed: int = field(
        default=42,
        metadata={"help": "seeds the short-block draws (per document, so runner-independent)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier run in output_dir"})

    def __post_init__(self):
        if self.max_seq_length < 3:
            raise ValueError(f"--max_seq_length {self.max_seq_length} leaves no room for tokens besides [CLS]/[SEP]")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"--short_seq_prob {self.short_seq_prob} is not a probability")
        if self.shard_size_mb <= 0 or min(self.tokenize_batch_sentences, self.tokenizer_threads) < 1:
            raise ValueError("--shard_size_mb, --tokenize_batch_sentences and --tokenizer_threads must be positive")
        if self.num_shards < 0:
            raise ValueError(f"--num_shards {self.num_shards} is negative")


class TokenizeAndPack(beam.DoFn):
    """Documents -> (shard, PackedDocument); tokenizes the sentences of many documents per tokenizer call."""

    def __init__(self, tokenizer_path: str, config: PretrainDataConfig, num_shards: int):
        self.tokenizer_path = tokenizer_path  # preprocessing.tokenize.stage_tokenizer's file
        self.config = config
        self.num_shards = num_shards
        self.launcher_pid = os.getpid()
        self.counters = {n: Metrics.counter("preprocessing", n) for n in ("documents", "blocks", "tokens", "sentences")}

    def setup(self):
        setup_worker_process(self.config.tokenizer_threads, self.launcher_pid)
        self.encoder = BatchEncoder(read_staged_tokenizer(self.tokenizer_path))
        self.progress = Progress("pretrain_data")

    def start_bundle(self):
        self.pending, self.pending_sentences = [], 0

    def process(self, document):
        sentences = split_sentences(document.text)
        self.pending.append((document, sentences))
        self.pending_sentences += len(sentences)
        if self.pending_sentences >= self.config.tokenize_batch_sentences:
            yield from self._flush()

    def finish_bundle(self):
        for output in self._flush():
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, GlobalWindows.windowed_value(output.value))
            else:
                yield GlobalWindows.windowed_value(output)

    def _flush(self):
        pending, self.pending, self.pending_sentences = self.pending, [], 0
        if not pending:
            return
        encoded = self.encoder.encode_documents([sentences for _, sentences in pending])
        cfg, documents, tokens = self.config, 0, 0
        for (document, _), enc in zip(pending, encoded):
            name = f"{document.key[0]}:{document.key[1]}"
            if len(enc.input_ids) == 0:
                detail = "the tokenizer produced no tokens"
                yield dead_letter(document.file, document.key[1], "no_tokens", detail, document.text)
                continue
            rng = random.Random(f"{cfg.seed}:{name}")
            packed = pack_document(document.key, document.doc_id, enc.input_ids, enc.word_starts,
                                   enc.sentence_lengths, cfg.max_seq_length - 2, cfg.short_seq_prob, rng,
                                   cfg.bow_weighting)
            yield shard_of(name, self.num_shards), packed
            documents, tokens = documents + 1, tokens + packed.num_tokens
            self.counters["blocks"].inc(len(packed.block_lengths))
            self.counters["sentences"].inc(len(enc.sentence_lengths))
        self.counters["documents"].inc(documents)
        self.counters["tokens"].inc(tokens)
        self.progress.add(documents, tokens)


class WritePretrainManifest(beam.DoFn):
    """Runs once, after every shard and the dead-letter file exist: writes the shards no document went to
    (empty, so the folder always holds num_shards files) and sums all stats into manifest.json."""

    def __init__(self, output: OutputDir, num_shards: int, manifest_fields: dict):
        self.output = output
        self.num_shards = num_shards
        self.manifest_fields = manifest_fields

    def process(self, written_stats, dead_letter_reasons):
        written = {s.info.file for s in written_stats}
        empty = [write_shard(self.output, i, self.num_shards, []) for i in range(self.num_shards)
                 if shard_name(i, self.num_shards) not in written]
        stats = sorted([*written_stats, *empty], key=lambda s: s.info.file)
        counts = {
            "documents": sum(s.documents for s in stats),
            "blocks": sum(s.info.rows for s in stats),
            "tokens": sum(s.tokens for s in stats),
            "dead_letter": sum(dead_letter_reasons.values()),
        }
        extra = {"dead_letter_reasons": dict(sorted(dead_letter_reasons.items()))}
        shards = [s.info for s in stats]
        manifest = Manifest(kind="pretrain", shards=shards, counts=counts, extra=extra, **self.manifest_fields)
        write_manifest(self.output, manifest)
        yield counts


def build_pipeline(
    pipeline: beam.Pipeline, cfg: PretrainDataConfig, files, tokenizer, num_shards: int, pipeline_args,
    output: OutputDir,
) -> None:
    spec = RecordSpec(tuple(cfg.text_fields), id_field=cfg.id_field or None)
    parsed = (
        pipeline
        | "InputFiles" >> beam.Create(files)
        | "ReadRecords" >> beam.ParDo(ReadRecords(cfg.input_format, [*cfg.text_fields, cfg.id_field]))
        | "Reshuffle" >> beam.Reshuffle()
        | "Parse" >> beam.ParDo(ParseRecords(spec)).with_outputs(DEAD_LETTER_TAG, main="documents")
    )
    packed = parsed.documents | "TokenizeAndPack" >> beam.ParDo(
        TokenizeAndPack(stage_tokenizer(tokenizer, output), cfg, num_shards)
    ).with_outputs(DEAD_LETTER_TAG, main="documents")
    shard_stats = (
        packed.documents
        | "GroupByShard" >> beam.GroupByKey()
        | "WriteShards" >> beam.ParDo(WriteShard(output, num_shards))
    )
    dead = (parsed[DEAD_LETTER_TAG], packed[DEAD_LETTER_TAG]) | "FlattenDeadLetters" >> beam.Flatten()
    reasons = dead | "WriteDeadLetters" >> WriteDeadLetters(output)
    manifest_fields = {
        "tokenizer": cfg.tokenizer, "vocab_hash": vocab_hash(tokenizer), "max_seq_length": cfg.max_seq_length,
        "options": {**asdict(cfg), "pipeline_args": list(pipeline_args), "num_shards": num_shards},
    }
    manifest_writer = WritePretrainManifest(output, num_shards, manifest_fields)
    _ = (
        shard_stats
        | "CollectShardStats" >> beam.combiners.ToList()
        | "WriteManifest" >> beam.ParDo(manifest_writer, beam.pvalue.AsSingleton(reasons))
    )


def choose_num_shards(cfg: PretrainDataConfig, files) -> int:
    """--num_shards, else from the inputs' size: measured only then, as it opens every compressed or Parquet
    input (many remote reads at launch)."""
    if cfg.num_shards:
        return cfg.num_shards
    columns = [*cfg.text_fields, cfg.id_field] if cfg.id_field else cfg.text_fields
    input_bytes = sum(content_bytes(f, cfg.input_format, columns) for f in files)
    return estimate_num_shards(input_bytes, cfg.shard_size_mb)


def run(argv: Sequence[str] | None = None) -> Manifest:
    """Parse flags, check inputs, tokenizer and output folder (one-line errors), run the job, return its manifest."""
    cfg, pipeline_args = parse_config(PretrainDataConfig, argv, __doc__.split("\n")[0])
    check_paths_reach_workers(pipeline_args, [("output_dir", cfg.output_dir), *(("input", p) for p in cfg.input)])
    files = expand_inputs(cfg.input)
    tokenizer = load_tokenizer(cfg.tokenizer)
    prepare_output_dir(cfg.output_dir, cfg.overwrite)
    num_shards = choose_num_shards(cfg, files)
    logger.info("pretrain_data: %d input files, %d shards -> %s", len(files), num_shards, cfg.output_dir)
    output = OutputDir(cfg.output_dir)
    start = time.monotonic()
    with make_pipeline(pipeline_args, cfg.tokenizer_threads) as pipeline:
        build_pipeline(pipeline, cfg, files, tokenizer, num_shards, pipeline_args, output)
    output.remove_temporary()
    manifest = read_manifest(cfg.output_dir)
    log_summary("pretrain_data", manifest.counts, time.monotonic() - start)
    return manifest


def shards_from_texts(texts: Sequence[str], output_dir: str | Path, *args: str) -> Manifest:
    """Test helper: shards from a list of documents, in-process (DirectRunner, in_memory). `args` are extra
    flags, e.g. "--max_seq_length", "64", "--tokenizer", path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        local = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
        return run(["--input", str(path), "--output_dir", str(output_dir), *local, *args])


def main(argv: Sequence[str] | None = None) -> None:
    main_entry(run, argv)


if __name__ == "__main__":  # run the imported module, so pickled classes are found by name on workers
    from preprocessing.pretrain_data import main as module_main

    module_main()
