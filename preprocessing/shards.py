"""Output side shared by both jobs: the output folder check, Arrow IPC files, shard assignment, the manifest.

Files go through Beam's FileSystems, so DIR may be local, gs://, s3:// or hdfs://. Arrow is written in the
IPC *file* format (random access, memory-mappable with `pa.memory_map` + `pa.ipc.open_file`).
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from common.shard_format import MANIFEST_NAME, PRETRAIN_SCHEMA, Manifest, ShardInfo, shard_name
from preprocessing.packing import PackedDocument
from preprocessing.records import DEAD_LETTER_FILE
from preprocessing.runner import PreflightError
from preprocessing.writes import (
    ROWS_PER_BATCH, TEMPORARY, OutputDir, atomic_create, remove_local_folders, write_bytes,
)

# Output bytes per input byte, measured on ../shared/data/gutenberg (English prose, BERT vocabulary,
# max_seq_length 512): 26.2 MB of JSONL gave 48.5 MB of shards. Only used to pick the shard count up front.
OUTPUT_BYTES_PER_INPUT_BYTE = 1.9


class OutputDirError(PreflightError):
    """The output folder holds files and --overwrite was not given: raised before any work."""


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`; then remove what earlier runs of these jobs wrote.

    Lists by prefix, not by asking whether the folder exists: on an object store (gs://, s3://) a folder is
    never an object of its own, only the prefix of the objects in it.
    """
    try:
        existing = [m.path for m in FileSystems.match([FileSystems.join(output_dir, "**")])[0].metadata_list]
    except Exception as exc:  # Beam raises BeamIOError with a nested exception map
        raise OutputDirError(f"cannot list output_dir {output_dir}: {exc}") from None
    if existing and not overwrite:
        raise OutputDirError(
            f"output_dir {output_dir} is not empty ({len(existing)} files); pass --overwrite to replace it"
        )
    ours = [p for p in existing
            if p.endswith((".arrow", MANIFEST_NAME)) or DEAD_LETTER_FILE in p or f"/{TEMPORARY}/" in p]
    if ours:
        FileSystems.delete(ours)
        remove_local_folders(output_dir)


def estimate_num_shards(input_bytes: int, shard_size_mb: float) -> int:
    """Shard count fixed before the run (so it cannot depend on the runner) from the inputs' total size."""
    return max(1, math.ceil(input_bytes * OUTPUT_BYTES_PER_INPUT_BYTE / (shard_size_mb * 2**20)))


def shard_of(doc_name: str, num_shards: int) -> int:
    """A stable hash of the document's "file:line" name: all blocks of a document go to the same shard."""
    digest = hashlib.blake2b(doc_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


#: Values one list<...> array can hold: Arrow's list type has int32 offsets.
MAX_LIST_VALUES = np.iinfo(np.int32).max


def ragged_list_array(row_lengths: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """A list<value_type> Arrow array from flat values and each row's length, without per-row Python work.

    Offsets are summed in int64 and refused past MAX_LIST_VALUES (an int32 sum would wrap, and Arrow accepts
    offsets that go backwards: the file would be written and read back with wrong rows); the array is validated
    in full before it is written."""
    offsets = np.zeros(len(row_lengths) + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    if offsets[-1] > MAX_LIST_VALUES:
        raise ValueError(f"{int(offsets[-1])} {value_type} values in one Arrow table: over list<{value_type}>'s limit "
                         f"of {MAX_LIST_VALUES} (int32 offsets); write fewer rows per table (more shards)")
    array = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))
    array.validate(full=True)
    return array


def list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """A list<value_type> Arrow array with one row per numpy array."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    return ragged_list_array(lengths, _concatenate(arrays), value_type)


def _concatenate(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)


def blocks_table(documents: Sequence[PackedDocument]) -> pa.Table:
    """One row per block of `documents`, in their order."""
    rows = _concatenate([d.block_lengths for d in documents])
    bow_rows = _concatenate([d.bow_lengths for d in documents])
    columns = [
        pa.array([d.doc_id for d in documents for _ in range(len(d.block_lengths))], type=pa.string()),
        ragged_list_array(rows, _concatenate([d.input_ids for d in documents]), pa.int32()),
        ragged_list_array(rows, _concatenate([d.word_starts for d in documents]), pa.bool_()),
        ragged_list_array(bow_rows, _concatenate([d.bow_ids for d in documents]), pa.int32()),
        ragged_list_array(bow_rows, _concatenate([d.bow_weights for d in documents]), pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=PRETRAIN_SCHEMA)


def write_arrow(output: OutputDir, name: str, batches: Iterable[pa.Table], schema: pa.Schema) -> str:
    """DIR/`name` as one Arrow IPC file, written atomically and streamed table by table (never the whole file in
    memory); returns the file's sha256."""
    with atomic_create(output, output.final(name)) as handle:
        with pa.ipc.new_file(handle, schema) as writer:
            for table in batches:
                writer.write_table(table, max_chunksize=ROWS_PER_BATCH)
    return handle.sha256.hexdigest()


@dataclass(frozen=True)
class ShardStats:
    info: ShardInfo
    documents: int
    tokens: int


def _batches_of(documents: Sequence[PackedDocument]) -> Iterator[pa.Table]:
    """The shard's rows a record batch (about ROWS_PER_BATCH blocks, whole documents) at a time."""
    start, blocks = 0, 0
    for end, document in enumerate(documents, start=1):
        blocks += len(document.block_lengths)
        if blocks >= ROWS_PER_BATCH or end == len(documents):
            yield blocks_table(documents[start:end])
            start, blocks = end, 0


def write_shard(output: OutputDir, index: int, num_shards: int, documents: Iterable[PackedDocument]) -> ShardStats:
    """One shard file, documents sorted by (file, line): the same bytes on any runner and worker count. Built
    a record batch at a time, so a shard's writer holds its documents and one batch, not a second copy."""
    documents = sorted(documents, key=lambda d: d.key)
    name = shard_name(index, num_shards)
    sha = write_arrow(output, name, _batches_of(documents), PRETRAIN_SCHEMA)
    rows = sum(len(d.block_lengths) for d in documents)
    return ShardStats(ShardInfo(name, rows, sha), len(documents), sum(d.num_tokens for d in documents))


class WriteShard(beam.DoFn):
    """(shard index, packed documents) -> the shard file and its ShardStats."""

    def __init__(self, output: OutputDir, num_shards: int):
        self.output = output
        self.num_shards = num_shards

    def process(self, keyed):
        index, documents = keyed
        yield write_shard(self.output, index, self.num_shards, documents)


def read_manifest(output_dir: str) -> Manifest:
    """Manifest.read through FileSystems (a local copy first), so remote output folders work too."""
    with tempfile.TemporaryDirectory() as tmp:
        with FileSystems.open(FileSystems.join(output_dir, MANIFEST_NAME)) as handle:
            (Path(tmp) / MANIFEST_NAME).write_bytes(handle.read())
        return Manifest.read(tmp)


def write_manifest(output: OutputDir, manifest: Manifest) -> None:
    """Manifest.write to a local temp folder, then copied atomically through FileSystems (remote DIR too)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest.write(tmp)
        write_bytes(output, MANIFEST_NAME, (Path(tmp) / MANIFEST_NAME).read_bytes())
