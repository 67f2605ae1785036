"""On-disk embedding cache: one folder of .npy arrays per (model, data, representation, max length, shard, ...).

The key hashes everything that changes the vectors: the model folder's files (name, size, mtime), the data files
(path, size, mtime), the representation config, max length, precision and shard. A changed checkpoint or
dataset therefore misses the cache instead of returning stale vectors. Entries are written to a temporary
folder and renamed, so a killed run never leaves a half entry that a later run would trust; a later run removes
the temporary folders of killed writers (`evaluation.sparse_index.sweep_stale`). Arrays are read back memory-mapped:
a corpus shard larger than RAM is searched from the page cache, never loaded whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from evaluation.encode import Encoded

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def fingerprint(path: str | Path) -> dict:
    """Identity of a file or folder by its files' names, sizes and modification times; a hub name is kept as is."""
    p = Path(path)
    if not p.exists():
        return {"name": str(path)}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()),
            "files": [[str(f.relative_to(p)) if f != p else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                      for f in files]}


def cache_key(**parts) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def load_arrays(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The arrays NAME.npy of a cache entry, memory-mapped read-only (None where absent)."""
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") if (folder / f"{name}.npy").is_file() else None
            for name in names}


def load(cache_dir: str | Path, key: str) -> Encoded | None:
    folder = Path(cache_dir) / key
    if not (folder / "ids.json").is_file():
        return None
    logger.info("embedding cache hit: %s", folder)
    return Encoded(json.loads((folder / "ids.json").read_text()), **load_arrays(folder, Encoded.ARRAYS),
                   source=str(folder))


def save_arrays(cache_dir: str | Path, key: str, arrays: dict[str, np.ndarray | None], description: dict,
                extra: dict[str, object] | None = None) -> None:
    """Write a cache entry atomically: arrays as NAME.npy, `description` as key.json, `extra` as NAME.json."""
    folder = Path(cache_dir) / key
    tmp = Path(cache_dir) / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if array is not None:
            np.save(tmp / f"{name}.npy", array)
    (tmp / "key.json").write_text(json.dumps(description, indent=2, default=str) + "\n")
    for name, value in (extra or {}).items():
        (tmp / f"{name}.json").write_text(json.dumps(value))
    try:
        tmp.rename(folder)
    except OSError:  # another rank wrote the same entry first; theirs is equal
        shutil.rmtree(tmp, ignore_errors=True)


def save(cache_dir: str | Path, key: str, encoded: Encoded, description: dict) -> None:
    save_arrays(cache_dir, key, {name: getattr(encoded, name) for name in Encoded.ARRAYS}, description,
                {"ids": encoded.ids})


def drop_pages(*arrays) -> None:
    """Let the kernel unmap this process's resident pages of memory-mapped arrays (the page cache keeps them, so a
    later read is a cheap fault): a search over a memory-mapped corpus then holds one batch's rows, not the corpus."""
    for array in arrays:
        mapping = getattr(array, "_mmap", None)  # np.memmap's mmap object (np.load(mmap_mode="r"))
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)
