"""Output side shared by both jobs: the output folder check, Arrow IPC files, shard assignment, the manifest.

Files go through Beam's FileSystems, so DIR may be local, gs://, s3:// or hdfs://. Arrow is written in the
IPC *file* format (random access, memory-mappable with `pa.memory_map` + `pa.ipc.open_file`).
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from common.shard_format import MANIFEST_NAME, PRETRAIN_SCHEMA, Manifest, ShardInfo, shard_name
from preprocessing.packing import Block
from preprocessing.records import DEAD_LETTER_FILE
from preprocessing.runner import PreflightError

ROWS_PER_BATCH = 1024  # Arrow record batch size inside a shard file
# Output bytes per input byte, measured on ../shared/data/gutenberg (English prose, BERT vocabulary,
# max_seq_length 512): 26.2 MB of JSONL gave 48.5 MB of shards. Only used to pick the shard count up front.
OUTPUT_BYTES_PER_INPUT_BYTE = 1.9


class OutputDirError(PreflightError):
    """The output folder holds files and --overwrite was not given: raised before any work."""


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`; then remove what earlier runs of these jobs wrote."""
    pattern = FileSystems.join(output_dir, "**")
    existing = [m.path for m in FileSystems.match([pattern])[0].metadata_list] if FileSystems.exists(output_dir) else []
    if existing and not overwrite:
        raise OutputDirError(
            f"output_dir {output_dir} is not empty ({len(existing)} files); pass --overwrite to replace it"
        )
    ours = [p for p in existing if p.endswith((".arrow", MANIFEST_NAME)) or DEAD_LETTER_FILE in p]
    if ours:
        FileSystems.delete(ours)


def estimate_num_shards(input_bytes: int, shard_size_mb: float) -> int:
    """Shard count fixed before the run (so it cannot depend on the runner) from the inputs' total size."""
    return max(1, math.ceil(input_bytes * OUTPUT_BYTES_PER_INPUT_BYTE / (shard_size_mb * 2**20)))


def shard_of(doc_name: str, num_shards: int) -> int:
    """A stable hash of the document's "file:line" name: all blocks of a document go to the same shard."""
    digest = hashlib.blake2b(doc_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """A list<value_type> Arrow array from numpy arrays without per-row Python conversion."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def blocks_table(blocks: Sequence[Block]) -> pa.Table:
    columns = [
        pa.array([b.doc_id for b in blocks], type=pa.string()),
        list_array([b.input_ids for b in blocks], pa.int32()),
        list_array([b.word_starts for b in blocks], pa.bool_()),
        list_array([b.bow_ids for b in blocks], pa.int32()),
        list_array([b.bow_weights for b in blocks], pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=PRETRAIN_SCHEMA)


def write_arrow(path: str, table: pa.Table) -> str:
    """Write `table` as one Arrow IPC file; returns the file's sha256."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
    data = sink.getvalue().to_pybytes()
    with FileSystems.create(path) as handle:
        handle.write(data)
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardStats:
    info: ShardInfo
    documents: int
    tokens: int


class WriteShard(beam.DoFn):
    """(shard index, blocks) -> the shard file, rows sorted by (file, line, block): the same bytes on any runner."""

    def __init__(self, output_dir: str, num_shards: int):
        self.output_dir = output_dir
        self.num_shards = num_shards

    def process(self, keyed):
        index, blocks = keyed
        blocks = sorted((b for b in blocks if b is not None), key=lambda b: b.key)
        name = shard_name(index, self.num_shards)
        sha = write_arrow(FileSystems.join(self.output_dir, name), blocks_table(blocks))
        documents = len({b.key[:2] for b in blocks})
        yield ShardStats(ShardInfo(name, len(blocks), sha), documents, sum(len(b.input_ids) for b in blocks))


def read_manifest(output_dir: str) -> Manifest:
    """Manifest.read through FileSystems (a local copy first), so remote output folders work too."""
    with tempfile.TemporaryDirectory() as tmp:
        with FileSystems.open(FileSystems.join(output_dir, MANIFEST_NAME)) as handle:
            (Path(tmp) / MANIFEST_NAME).write_bytes(handle.read())
        return Manifest.read(tmp)


def write_manifest(output_dir: str, manifest: Manifest) -> None:
    """Manifest.write to a local temp folder, then copied through FileSystems (works for remote DIR too)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest.write(tmp)
        data = (Path(tmp) / MANIFEST_NAME).read_bytes()
    with FileSystems.create(FileSystems.join(output_dir, MANIFEST_NAME)) as handle:
        handle.write(data)
