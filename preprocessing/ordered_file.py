"""One output file from a whole PCollection, rows in a fixed order, without gathering the rows on one worker.

A single file (corpus.arrow, the dead letters) has to be written by one worker, but that worker need not hold
it: rows are grouped by a range of input lines (`LINES_PER_PART`), each range is sorted and written to a
temporary part file by whichever worker gets it, and one last step concatenates the parts in order, streaming
one record batch (or one chunk of bytes) at a time. Only the parts' names travel under a single key, so the
memory per worker stays flat as the corpus grows (benchmarks/preprocess_memory.py) and the bytes do not depend
on how the runner split the work.

Rows come as (sort key, row), the sort key a tuple (file, line, ...) that orders rows totally: rows whose keys
tie must be identical, or their order (and the file's bytes) would depend on the runner.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from common.shard_format import ShardInfo
from preprocessing.runner import GatherAll
from preprocessing.writes import ROWS_PER_BATCH, OutputDir, atomic_create

LINES_PER_PART = 20_000  # input lines per part: bounds the rows one worker sorts and holds at once
COPY_BYTES = 8 * 2**20  # how much of a part the concatenating step reads at once


@dataclass(frozen=True)
class Part:
    key: tuple  # (file, first line // LINES_PER_PART): the parts' order in the final file
    path: str  # the part's file in the run's temporary folder
    rows: int
    stats: dict[str, int]


@dataclass(frozen=True)
class ArrowRows:
    """Rows -> an Arrow table (`to_table`, a module-level function, for pickling); parts are IPC streams."""

    schema: pa.Schema
    to_table: Callable[[list, pa.Schema], pa.Table]

    def write_part(self, rows: list, handle) -> None:
        with pa.ipc.new_stream(handle, self.schema) as writer:
            writer.write_table(self.to_table(rows, self.schema), max_chunksize=ROWS_PER_BATCH)

    def concatenate(self, parts: Iterable[str], handle) -> None:
        """The parts' record batches, in order, into one IPC file (random access, memory-mappable)."""
        with pa.ipc.new_file(handle, self.schema) as writer:
            for path in parts:
                with FileSystems.open(path) as source:
                    for batch in pa.ipc.open_stream(source):
                        writer.write_batch(batch)


class JsonLines:
    """Rows with a `to_json()` -> one JSON line each; parts concatenate byte for byte."""

    def write_part(self, rows: list, handle) -> None:
        handle.write("".join(row.to_json() + "\n" for row in rows).encode("utf-8"))

    def concatenate(self, parts: Iterable[str], handle) -> None:
        for path in parts:
            with FileSystems.open(path) as source:
                for chunk in iter(lambda: source.read(COPY_BYTES), b""):
                    handle.write(chunk)


def part_of(sort_key: tuple, lines_per_part: int) -> tuple:
    return sort_key[0], sort_key[1] // lines_per_part


class _WritePart(beam.DoFn):
    def __init__(self, output: OutputDir, name: str, fmt, stats: Callable[[list], dict[str, int]]):
        self.output, self.name, self.fmt, self.stats = output, name, fmt, stats

    def process(self, keyed):
        key, rows = keyed
        rows = [row for _, row in sorted(rows, key=lambda kv: kv[0])]
        digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).hexdigest()  # same name on a retry
        path = self.output.temporary(f"parts/{self.name.replace('/', '_')}/{digest}")
        with atomic_create(self.output, path) as handle:
            self.fmt.write_part(rows, handle)
        yield Part(key, path, len(rows), self.stats(rows))


class _Concatenate(beam.DoFn):
    def __init__(self, output: OutputDir, name: str, fmt, stats: Callable[[list], dict[str, int]]):
        self.output, self.name, self.fmt, self.stats = output, name, fmt, stats

    def process(self, keyed):
        parts = sorted(keyed[1], key=lambda p: p.key)
        with atomic_create(self.output, self.output.final(self.name)) as handle:
            self.fmt.concatenate([p.path for p in parts], handle)
        stats = Counter(self.stats([]))  # no parts (no rows) still gives every key
        for part in parts:
            stats.update(part.stats)  # adds, keeping zero and negative sums (Counter's + would drop them)
        yield ShardInfo(self.name, sum(p.rows for p in parts), handle.sha256.hexdigest()), dict(stats)


class WriteInOrder(beam.PTransform):
    """(sort key, row) -> DIR/`name` with every row in sort-key order; outputs one (ShardInfo, summed stats),
    also when there are no rows (the file is then written empty)."""

    def __init__(self, output: OutputDir, name: str, fmt, stats: Callable[[list], dict[str, Any]]):
        super().__init__()
        self.output, self.name, self.fmt, self.stats = output, name, fmt, stats
        self.lines_per_part = LINES_PER_PART

    def expand(self, rows):
        return (
            rows
            | "KeyByPart" >> beam.Map(lambda kv, n: (part_of(kv[0], n), kv), self.lines_per_part)
            | "GroupByPart" >> beam.GroupByKey()
            | "WritePart" >> beam.ParDo(_WritePart(self.output, self.name, self.fmt, self.stats))
            | "GatherParts" >> GatherAll()
            | "Concatenate" >> beam.ParDo(_Concatenate(self.output, self.name, self.fmt, self.stats))
        )
