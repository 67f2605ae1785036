"""Writes into the output folder that no reader sees half-done, on a local disk or an object store.

Every file goes first to this run's temporary folder, DIR/_temporary/RUN_ID/, and is renamed to its final name
only once it is complete: a killed or retried write leaves at most a temporary file behind, never a truncated
file under a final name. On an object store (gs://, s3://) the rename is a copy, which also appears whole or not
at all; closing a half-written upload, as `with` does on an exception, would otherwise publish it. The launcher
removes the temporary folder once the pipeline has finished; `--overwrite` removes what a killed run left there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from apache_beam.io.filesystems import FileSystems

ROWS_PER_BATCH = 1024  # Arrow record batch size inside every written file
TEMPORARY = "_temporary"  # DIR/_temporary/RUN_ID/: parts and half-written files of running (or killed) runs


@dataclass(frozen=True)
class OutputDir:
    """The output folder (local, gs://, s3://, hdfs://) and this run's temporary folder inside it."""

    path: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def final(self, name: str) -> str:
        return FileSystems.join(self.path, name)

    def temporary(self, name: str) -> str:
        return FileSystems.join(self.path, TEMPORARY, self.run_id, name)

    def remove_temporary(self) -> None:
        """Delete this run's temporary folder (after the pipeline: parts are read until its last step)."""
        leftovers = [m.path for m in FileSystems.match([self.temporary("**")])[0].metadata_list]
        if leftovers:
            FileSystems.delete(leftovers)
        remove_local_folders(self.path, self.run_id)


def remove_local_folders(output_dir: str, run_id: str = "") -> None:
    """On a local disk, the emptied folders under DIR/_temporary/ (RUN_ID's, or all with no run_id); DIR/_temporary
    itself once empty. Object stores have no folders."""
    if FileSystems.get_scheme(output_dir) is not None:
        return
    root = os.path.join(output_dir, TEMPORARY)
    shutil.rmtree(os.path.join(root, run_id) if run_id else root, ignore_errors=True)
    try:
        os.rmdir(root)
    except OSError:  # absent, or another run's files are still there
        pass


class HashingWriter:
    """A write-only file object over a FileSystems handle that keeps the sha256 of what went through it."""

    closed = False

    def __init__(self, handle):
        self.handle, self.sha256, self.position = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.sha256.update(data)
        self.handle.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:  # pyarrow closes its sink; the handle is closed by `atomic_create`
        pass


@contextmanager
def atomic_create(output: OutputDir, path: str) -> Iterator[HashingWriter]:
    """A writer for `path` (a final or a temporary name in `output`) that writes a temporary file first and
    renames it to `path` only once the `with` block has succeeded."""
    temporary = output.temporary(f"writing/{uuid.uuid4().hex}")
    try:
        with FileSystems.create(temporary) as handle:
            yield HashingWriter(handle)
    except BaseException:
        _delete_quietly(temporary)
        raise
    _make_parent(path)
    FileSystems.rename([temporary], [path])


def write_bytes(output: OutputDir, name: str, data: bytes) -> str:
    """DIR/`name` := `data`, atomically; returns its sha256."""
    with atomic_create(output, output.final(name)) as writer:
        writer.write(data)
    return writer.sha256.hexdigest()


def _make_parent(path: str) -> None:
    """A rename needs the target's folder where folders are real (local disk, HDFS: has_dirs); object stores
    have none, and a "folder" there never exists."""
    if not FileSystems.get_filesystem(path).has_dirs():
        return
    parent = FileSystems.split(path)[0]
    if not FileSystems.exists(parent):
        try:
            FileSystems.mkdirs(parent)
        except OSError:  # another worker made it first
            if not FileSystems.exists(parent):
                raise


def _delete_quietly(path: str) -> None:
    try:
        if FileSystems.exists(path):
            FileSystems.delete([path])
    except Exception:  # the write's own error is the one to report; --overwrite removes what is left
        pass
