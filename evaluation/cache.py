"""On-disk embedding cache: one folder of .npy arrays per (model, data, representation, max length, shard, ...).

The key hashes everything that changes the vectors: the model folder's files (name, size, mtime), the data files
(path, size, mtime), the representation config, max length, precision and shard. A changed checkpoint or
dataset therefore misses the cache instead of returning stale vectors. Entries are written to a temporary
folder and renamed, so a killed run never leaves a half entry that a later run would trust.
"""
from __future__ import annotations

import hashlib
import json
import logging
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


def load(cache_dir: str | Path, key: str) -> Encoded | None:
    folder = Path(cache_dir) / key
    if not (folder / "ids.json").is_file():
        return None
    arrays = {name: np.load(folder / f"{name}.npy") if (folder / f"{name}.npy").is_file() else None
              for name in Encoded.ARRAYS}
    logger.info("embedding cache hit: %s", folder)
    return Encoded(json.loads((folder / "ids.json").read_text()), **arrays)


def save(cache_dir: str | Path, key: str, encoded: Encoded, description: dict) -> None:
    folder = Path(cache_dir) / key
    tmp = Path(cache_dir) / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in Encoded.ARRAYS:
        array = getattr(encoded, name)
        if array is not None:
            np.save(tmp / f"{name}.npy", array)
    (tmp / "key.json").write_text(json.dumps(description, indent=2, default=str) + "\n")
    (tmp / "ids.json").write_text(json.dumps(encoded.ids))
    try:
        tmp.rename(folder)
    except OSError:  # another rank wrote the same entry first; theirs is equal
        shutil.rmtree(tmp, ignore_errors=True)
