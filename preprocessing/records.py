"""Reading input records (JSONL, plain text, Parquet) with their file and line, and the dead-letter output.

Every record carries (file index, line) from the start: that pair is its identity for sorting, seeding and
error reports, which is what makes the output independent of how a runner splits and orders the work.
Bad records are not dropped: they become `DeadLetter`s, counted and written to DIR/dead_letter/.
"""
from __future__ import annotations

import bz2
import json
import logging
import lzma
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from preprocessing.ordered_file import JsonLines, WriteInOrder
from preprocessing.runner import PreflightError
from preprocessing.text import normalize
from preprocessing.writes import OutputDir

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "jsonl", "text", "parquet")
DEAD_LETTER_TAG = "dead_letter"
DEAD_LETTER_FILE = "dead_letter/dead_letter.jsonl"
_RAW_CHARS = 1000  # how much of a bad record the dead letter keeps
# Each input file is read whole by one worker, start to end (line numbers are counted from its start); past
# this size the job says so, since more, smaller files spread the reading over workers.
LARGE_INPUT_BYTES = 2**30
SAMPLE_BYTES = 4 * 2**20  # compressed bytes decompressed to measure a compressed input's ratio


class InputError(PreflightError):
    """An input glob matches nothing or a matched file cannot be read: raised before any work."""


@dataclass(frozen=True)
class InputFile:
    index: int  # position in the sorted list of all matched files
    path: str
    name: str  # path relative to the inputs' common folder: stable across machines, used in ids and reports
    size: int = 0  # bytes as stored (compressed, for .gz or Parquet)


@dataclass(frozen=True)
class RawRecord:
    file: InputFile
    line: int  # 1-based line (JSONL), first line of the document (text) or row number (Parquet)
    payload: bytes | dict  # the line's bytes, or the Parquet row's fields
    fmt: str = "jsonl"  # jsonl | text | parquet


@dataclass(frozen=True)
class Document:
    key: tuple[int, int]  # (file index, line)
    file: str  # InputFile.name, for error reports
    doc_id: str
    text: str  # normalized


@dataclass(frozen=True)
class DeadLetter:
    file: str
    line: int
    reason: str  # invalid_utf8 | invalid_json | not_an_object | missing_field | not_a_string | empty_document ...
    detail: str
    record: str  # the raw record, truncated

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def expand_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """All files matching the globs, sorted and checked readable; a one-line InputError otherwise."""
    sizes: dict[str, int] = {}
    for pattern in patterns:
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as exc:  # Beam raises BeamIOError with a nested exception map
            raise InputError(f"cannot list input {pattern!r}: {exc}") from None
        if not matched:
            raise InputError(f"input {pattern!r} matches no file")
        sizes.update((m.path, m.size_in_bytes) for m in matched)
    ordered = sorted(sizes)
    for path in ordered:
        try:
            with FileSystems.open(path) as handle:
                handle.read(1)
        except Exception as exc:
            raise InputError(f"cannot read input {path}: {exc}") from None
        if sizes[path] > LARGE_INPUT_BYTES:
            logger.warning(
                "input %s is %.1f GiB: one worker reads it from start to end, and a failed read starts over; "
                "split it into files of at most %.1f GiB to spread the reading", path, sizes[path] / 2**30,
                LARGE_INPUT_BYTES / 2**30,
            )
    root = os.path.commonprefix(ordered).rpartition("/")[0]  # plain strings: works for gs://... URLs too
    return [InputFile(i, p, p[len(root) + 1 :] if root else p, sizes[p]) for i, p in enumerate(ordered)]


def content_bytes(file: InputFile, declared_format: str, columns: Sequence[str]) -> int:
    """About how many bytes of records `file` holds, uncompressed, to size shards by: a Parquet file's
    uncompressed size of the columns read; a compressed file's size times the ratio measured on its first
    SAMPLE_BYTES (exact when it is that small); otherwise its size."""
    if input_format(file.path, declared_format) == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(file.path) as handle:
            meta = pq.ParquetFile(handle).metadata
        wanted = set(columns)
        return sum(
            group.column(c).total_uncompressed_size
            for group in (meta.row_group(r) for r in range(meta.num_row_groups))
            for c in range(group.num_columns)
            if not wanted or group.column(c).path_in_schema in wanted
        )
    decompressor = _DECOMPRESSORS.get(CompressionTypes.detect_compression_type(file.path))
    if decompressor is None:
        return file.size
    with FileSystems.open(file.path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        sample = handle.read(SAMPLE_BYTES)
    inflated = decompressor().decompress(sample)
    return round(file.size * len(inflated) / max(1, len(sample)))


_DECOMPRESSORS = {  # stream decompressors that take a truncated input (Beam's other codecs: stored size)
    CompressionTypes.GZIP: lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    CompressionTypes.DEFLATE: lambda: zlib.decompressobj(),
    CompressionTypes.BZIP2: bz2.BZ2Decompressor,
    CompressionTypes.LZMA: lzma.LZMADecompressor,
}


def input_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    stem = path[: -len(".gz")] if path.endswith(".gz") else path
    if stem.endswith(".parquet"):
        return "parquet"
    if stem.endswith(".txt"):
        return "text"
    return "jsonl"


class ReadRecords(beam.DoFn):
    """One input file to its raw records; plain text holds one document per blank-line-separated paragraph
    group (BERT's pre-training text format)."""

    def __init__(self, declared_format: str, fields: Sequence[str]):
        self.declared_format = declared_format
        self.fields = list(fields)  # the Parquet columns to read (text and id fields)

    def process(self, file: InputFile) -> Iterator[RawRecord]:
        fmt = input_format(file.path, self.declared_format)
        if fmt == "parquet":
            yield from self._parquet(file)
            return
        with FileSystems.open(file.path) as handle:
            if fmt == "jsonl":
                for line, raw in enumerate(iter(handle.readline, b""), start=1):
                    yield RawRecord(file, line, raw, fmt)
            else:
                yield from self._text(file, handle)

    def _text(self, file: InputFile, handle) -> Iterator[RawRecord]:
        lines: list[bytes] = []
        first = 0
        for line, raw in enumerate(iter(handle.readline, b""), start=1):  # compressed files lack __iter__
            if raw.strip():
                first = first or line
                lines.append(raw)
            elif lines:
                yield RawRecord(file, first, b"".join(lines), "text")
                lines, first = [], 0
        if lines:
            yield RawRecord(file, first, b"".join(lines), "text")

    def _parquet(self, file: InputFile) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        with FileSystems.open(file.path) as handle:
            parquet = pq.ParquetFile(handle)
            available = set(parquet.schema_arrow.names)
            columns = [f for f in self.fields if f in available]
            row = 0
            for batch in parquet.iter_batches(columns=columns or None):
                for values in batch.to_pylist():
                    row += 1
                    yield RawRecord(file, row, values, "parquet")


@dataclass(frozen=True)
class RecordSpec:
    """Which fields of a record make its text and id."""

    text_fields: tuple[str, ...]  # joined with " " in this order
    optional_fields: tuple[str, ...] = ()  # text fields that may be absent (e.g. a BEIR title)
    id_field: str | None = None  # None: the id is "file:line"
    id_required: bool = False


def decode_line(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError("invalid_utf8", str(exc)) from None


def json_object(payload: bytes) -> dict:
    """A JSONL line as a dict, or a RecordError (invalid_utf8, invalid_json, not_an_object)."""
    try:
        value = json.loads(decode_line(payload))
    except json.JSONDecodeError as exc:
        raise RecordError("invalid_json", str(exc)) from None
    if not isinstance(value, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_record(record: RawRecord, spec: RecordSpec) -> Document:
    """A normalized Document, or a RecordError saying why not."""
    payload = record.payload
    if isinstance(payload, bytes):
        if record.fmt == "text":
            payload = {spec.text_fields[0]: decode_line(payload)}
        else:
            payload = json_object(payload)
    parts = []
    for name in spec.text_fields:
        value = payload.get(name)
        if value is None and name in spec.optional_fields:
            continue
        if value is None:
            raise RecordError("missing_field", f"no field {name!r}")
        if not isinstance(value, str):
            raise RecordError("not_a_string", f"field {name!r} is {type(value).__name__}, not a string")
        parts.append(value)
    text = normalize(" ".join(p for p in parts if p.strip()))
    if not text:
        raise RecordError("empty_document", f"no text in {', '.join(spec.text_fields)}")
    doc_id = payload.get(spec.id_field) if spec.id_field else None
    if doc_id is None or doc_id == "":
        if spec.id_required:
            raise RecordError("missing_field", f"no field {spec.id_field!r}")
        doc_id = f"{record.file.name}:{record.line}"
    return Document((record.file.index, record.line), record.file.name, str(doc_id), text)


def dead_letter(file: str, line: int, reason: str, detail: str, raw: bytes | str | dict) -> beam.pvalue.TaggedOutput:
    """A DeadLetter on the tagged output, counted in Beam metrics (in total and per reason)."""
    Metrics.counter("preprocessing", "dead_letter").inc()
    Metrics.counter("preprocessing", f"dead_letter_{reason}").inc()
    if isinstance(raw, dict):
        raw = json.dumps(raw, default=str)
    if isinstance(raw, bytes):
        raw = raw[: _RAW_CHARS * 4].decode("utf-8", errors="replace")
    letter = DeadLetter(file, line, reason, detail, raw[:_RAW_CHARS].rstrip("\n"))
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


class ParseRecords(beam.DoFn):
    """RawRecord -> Document, or a DeadLetter on the tagged output (counted per reason in Beam metrics)."""

    def __init__(self, spec: RecordSpec):
        self.spec = spec

    def process(self, record: RawRecord):
        try:
            yield parse_record(record, self.spec)
        except RecordError as exc:
            yield dead_letter(record.file.name, record.line, exc.reason, str(exc), record.payload)


def _dead_letter_reasons(letters: list[DeadLetter]) -> dict[str, int]:
    return dict(Counter(letter.reason for letter in letters))


class WriteDeadLetters(beam.PTransform):
    """All dead letters into DIR/dead_letter/dead_letter.jsonl, sorted by (file, line, reason, detail, record):
    a total order, so the bytes never depend on the runner (one line can give several letters, say one per
    unknown document it names). Outputs {reason: count}.

    The file is written even when empty, so a run's output folder always looks the same.
    """

    def __init__(self, output: OutputDir):
        super().__init__()
        self.output = output

    def expand(self, letters):
        return (
            letters
            | "SortKey" >> beam.Map(lambda d: ((d.file, d.line, d.reason, d.detail, d.record), d))
            | "WriteDeadLetterFile" >> WriteInOrder(self.output, DEAD_LETTER_FILE, JsonLines(), _dead_letter_reasons)
            | "Reasons" >> beam.MapTuple(lambda info, reasons: reasons)
        )
