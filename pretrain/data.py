"""Memory-mapped pre-training shards and a per-rank batch loader that resumes by arithmetic, not by replay.

The shards (see `common.shard_format`) are opened with `pa.memory_map`, so every rank shares the page cache
and nothing is copied until a batch is taken. Each epoch draws one permutation of all rows from
(seed, epoch); rank r takes every world_size-th entry of it (disjoint shares), cut to the same length on
every rank, so all ranks run the same number of steps. The loader's whole state is the number of
micro-batches consumed: resuming computes the epoch and the offset in its permutation directly, never
reading or iterating over the batches already seen. `Prefetcher` builds the next batches in a thread while
the accelerator computes (pyarrow and torch release the GIL), in order, so the batches stay deterministic.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.shard_format import PRETRAIN_SCHEMA, Manifest

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable shard folder (missing, wrong kind, wrong schema, wrong vocabulary); raised before training."""


class PretrainShards:
    """All shards of one folder as a single memory-mapped Arrow table, validated against the manifest."""

    def __init__(self, data_dir: str | Path, *, vocab_hash: str | None = None):
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"--data_dir {folder}: no such folder")
        try:
            self.manifest = Manifest.read(folder)
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"--data_dir {folder}: {exc}") from None
        if self.manifest.kind != "pretrain":
            raise DataError(f"{folder}/manifest.json: kind is {self.manifest.kind!r}, expected 'pretrain'")
        if vocab_hash is not None and vocab_hash != self.manifest.vocab_hash:
            raise DataError(
                f"{folder}/manifest.json: vocab_hash {self.manifest.vocab_hash[:12]}... (tokenizer "
                f"{self.manifest.tokenizer!r}) differs from the training tokenizer's {vocab_hash[:12]}...; "
                "tokenize the data with the model's tokenizer"
            )
        tables = [self._open(folder, info.file, info.rows) for info in self.manifest.shards]
        if not tables:
            raise DataError(f"{folder}/manifest.json: lists no shards")
        self.table = pa.concat_tables(tables)
        self.num_rows = self.table.num_rows
        if self.num_rows == 0:
            raise DataError(f"{folder}: the shards hold no rows")

    @staticmethod
    def _open(folder: Path, name: str, rows: int) -> pa.Table:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: listed in manifest.json but missing")
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{path}: not a complete Arrow IPC file (truncated or not Arrow): {exc}") from None
        for expected in PRETRAIN_SCHEMA:
            if expected.name not in table.schema.names:
                raise DataError(f"{path}: column {expected.name!r} is missing")
            actual = table.schema.field(expected.name).type
            if actual != expected.type:
                raise DataError(f"{path}: column {expected.name!r} has type {actual}, expected {expected.type}")
        if table.num_rows != rows:
            raise DataError(f"{path}: {table.num_rows} rows, manifest.json says {rows}")
        return table.select(PRETRAIN_SCHEMA.names)

    def log_unigram_prior(self, vocab_size: int, max_tokens: int = 50_000_000) -> np.ndarray:
        """log P(token) [V] from the first rows' tokens (up to max_tokens, add-one smoothed): the same on every rank."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        seen = 0
        for batch in self.table.column("input_ids").chunks:
            ids = batch.flatten().to_numpy()[: max_tokens - seen]
            if ids.size and int(ids.max()) >= vocab_size:
                raise DataError(f"token id {int(ids.max())} in the shards is outside the model's vocabulary "
                                f"({vocab_size})")
            counts += np.bincount(ids, minlength=vocab_size)
            seen += ids.size
            if seen >= max_tokens:
                break
        return np.log((counts + 1) / (counts.sum() + vocab_size))

    def rows(self, indices: np.ndarray) -> list[dict]:
        """The rows at these global indices, as dicts of the schema's columns (lists of Python values)."""
        return self.table.take(pa.array(indices, type=pa.int64())).to_pylist()


@dataclass
class LoaderState:
    micro_batches: int = 0  # micro-batches consumed on each rank since the start of training


class RankBatchLoader:
    """This rank's micro-batches: a disjoint stride of a (seed, epoch) permutation, resumable by position."""

    def __init__(self, shards: PretrainShards, *, batch_size: int, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.shards, self.batch_size, self.rank, self.world_size, self.seed = shards, batch_size, rank, world_size, seed
        self.rows_per_rank = shards.num_rows // world_size
        self.batches_per_epoch = self.rows_per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{shards.num_rows} rows cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )
        self.state = LoaderState()
        self._epoch, self._share = -1, np.empty(0, dtype=np.int64)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's row indices for an epoch, in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.shards.num_rows)
        return order[self.rank :: self.world_size][: self.rows_per_rank]

    def batch_indices(self, position: int) -> np.ndarray:
        """Row indices of micro-batch number `position` (0-based, counted across epochs)."""
        epoch, within = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._share = epoch, self.epoch_indices(epoch)
        start = within * self.batch_size
        return self._share[start : start + self.batch_size]

    def read(self, position: int) -> list[dict]:
        """The rows of micro-batch `position`; pure, so a prefetching thread may call it ahead of time."""
        return self.shards.rows(self.batch_indices(position))

    def consumed(self, position: int) -> None:
        """Record that micro-batch `position` went through a training step (the checkpointed position)."""
        self.state.micro_batches = position + 1

    def epoch(self) -> float:
        return self.state.micro_batches / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"micro_batches": self.state.micro_batches, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_rows": self.shards.num_rows}

    def load_state_dict(self, state: dict) -> None:
        """Jump to a saved position; the data and the split must be the ones it was saved with."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "batch_size", "num_rows"):
            if state[key] != mine[key]:
                raise DataError(f"cannot resume the data loader: checkpoint has {key}={state[key]}, "
                                f"this run {mine[key]}")
        self.state = LoaderState(micro_batches=int(state["micro_batches"]))


class Prefetcher:
    """Calls make(position) for position = start, start + 1, ... in a background thread, up to `depth` ahead,
    and hands the results out in order; an exception in the thread is raised by `next`."""

    def __init__(self, make: Callable[[int], object], start: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start), name="batch-prefetch", daemon=True)
        self._thread.start()

    def _run(self, make: Callable[[int], object], position: int) -> None:
        while not self._stop.is_set():
            try:
                item = (position, make(position), None)
            except Exception as exc:  # handed to the consumer, which raises it with its traceback
                item = (position, None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            position += 1

    def next(self) -> tuple[int, object]:
        """(position, make(position)) for the next position."""
        position, value, error = self._queue.get()
        if error is not None:
            raise error
        return position, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
