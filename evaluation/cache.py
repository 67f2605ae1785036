"""On-disk embedding cache: one folder of .npy arrays per (model, data, representation, max length, shard, ...).

The key hashes everything that changes the vectors: the model folder's files (name, size, mtime) or a hub name's
cached revision and blobs, the data files (path, size, mtime), the representation config, max length, precision and
shard. A changed checkpoint or dataset therefore misses the cache instead of returning stale vectors. Data edited
within its size and mtime (reordered lines) is caught by the ids: the entry is encoded again and replaced. Each entry
records its content digest (`content_digest`), on which search hits are keyed. Entries are written to a temporary
folder and renamed, so a killed run never leaves a half entry that a later run would trust. A temporary folder is
named by host, PID and a random suffix (`temporary`): tasks on several nodes, or in containers where each is PID 1,
share one cache folder without sharing a temporary name; a later run on the same host removes those nobody has
written for STALE_AFTER_SECONDS (`sweep_stale`). Arrays are read back memory-mapped:
a corpus shard larger than RAM is searched from the page cache, never loaded whole.
"""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from evaluation.encode import Encoded

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: A temporary folder nobody has written for this long is a killed writer's: a live one writes into it all along.
STALE_AFTER_SECONDS = 6 * 3600
DIGEST_CHUNK = 1 << 26  # bytes of an array hashed between two drops of its pages


def _host() -> str:
    """This machine's name as it appears in temporary names (no '-', so a name splits from the right)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temporary(folder: Path) -> Path:
    """A writer's own temporary sibling of `folder`, `.NAME.tmp-HOST-PID-RANDOM`: unique across nodes and PID
    namespaces that share the cache folder, and across threads and repeated writes of one process."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _swept_here(name: str) -> bool:
    """Whether this host sweeps the temporary folder `name`: its own `.NAME.tmp-HOST-PID-RANDOM`, and any
    `.NAME.tmp-PID` of the code before host names (no host to tell; stale for hours, no writer of that code is
    left)."""
    parts = name.rsplit("-", 3)  # [.NAME.tmp, HOST, PID, RANDOM]
    if len(parts) == 4 and parts[0].endswith(".tmp") and parts[2].isdigit():
        return parts[1] == _host()
    stem, _, pid = name.rpartition("-")
    return stem.endswith(".tmp") and pid.isdigit()


def sweep_stale(cache_dir: str | Path, now: float | None = None) -> None:
    """Remove this host's temporary folders that nobody has written for STALE_AFTER_SECONDS (killed builds or
    saves). Another host's are left alone: it may still be writing them, and its PIDs mean nothing here."""
    now = time.time() if now is None else now
    for tmp in Path(cache_dir).glob(".*.tmp-*"):
        if not _swept_here(tmp.name):
            continue
        try:
            written = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.rglob("*")])
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        if now - written > STALE_AFTER_SECONDS:
            logger.info("removing %s, left by a killed run (unwritten for %.0f h)", tmp, (now - written) / 3600)
            shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(path: str | Path) -> dict:
    """Identity of a file or folder by its files' names, sizes and modification times; a hub name by its cached
    revision and files (`hub_fingerprint`)."""
    p = Path(path)
    if not p.exists():
        return hub_fingerprint(str(path))
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return {"path": str(p.resolve()),
            "files": [[str(f.relative_to(p)) if f != p else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                      for f in files]}


def hub_fingerprint(name: str) -> dict:
    """A hub name as transformers loads it from the local hub cache: the commit `main` resolves to and each file's
    blob (named by its hash: sha256 for the weights), so a new revision under the same name is another key. A name
    with no cached snapshot keeps revision None (a warning says so)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        config = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a hub repo id (HFValidationError)
        config = None
    if not isinstance(config, str):
        logger.warning("%s: no cached hub snapshot; its cache entries are keyed by the name alone", name)
        return {"name": name, "revision": None}
    snapshot = Path(config).parent
    return {"name": name, "revision": snapshot.name,
            "files": [[str(f.relative_to(snapshot)), f.resolve().name] for f in sorted(snapshot.rglob("*"))
                      if f.is_file()]}


def cache_key(**parts) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def load_arrays(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray | None]:
    """The arrays NAME.npy of a cache entry, memory-mapped read-only (None where absent)."""
    return {name: np.load(folder / f"{name}.npy", mmap_mode="r") if (folder / f"{name}.npy").is_file() else None
            for name in names}


def content_digest(ids: list[str], arrays: dict[str, np.ndarray | None]) -> str:
    """sha256 of an entry's ids and arrays (name, dtype, shape, bytes). The entry's key hashes only what the
    vectors were made from, by file sizes and times; two corpora of equal size and time share a key, not this.
    Hashed chunk by chunk with a memory-mapped array's pages dropped, so hashing an entry (one written before its
    digest was recorded) does not leave the whole corpus in this process's resident set."""
    digest = hashlib.sha256(json.dumps(ids).encode("utf-8"))
    for name, array in sorted(arrays.items()):
        if array is not None:
            digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            for start in range(0, len(flat), DIGEST_CHUNK):
                digest.update(flat[start:start + DIGEST_CHUNK])
                drop_pages(array)
    return digest.hexdigest()


def load(cache_dir: str | Path, key: str) -> Encoded | None:
    folder = Path(cache_dir) / key
    if not (folder / "ids.json").is_file():
        return None
    logger.info("embedding cache hit: %s", folder)
    ids, arrays = json.loads((folder / "ids.json").read_text()), load_arrays(folder, Encoded.ARRAYS)
    digest_file = folder / "digest.json"
    if digest_file.is_file():
        digest = json.loads(digest_file.read_text())
    else:  # an entry written before digests were recorded: hashed once, then recorded beside it
        digest = content_digest(ids, arrays)
        record_digest(digest_file, digest)
    return Encoded(ids, **arrays, source=str(folder), digest=digest)


def record_digest(digest_file: Path, digest: str) -> None:
    """Write digest.json into an existing entry, atomically (a reader sees it whole or not at all). A read-only
    cache keeps hashing on each load: said once per load, not an error."""
    tmp = temporary(digest_file)
    try:
        tmp.write_text(json.dumps(digest))
        os.replace(tmp, digest_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        logger.info("%s: digest not recorded (%s); hashed again on the next load", digest_file, exc)


def save_arrays(cache_dir: str | Path, key: str, arrays: dict[str, np.ndarray | None], description: dict,
                extra: dict[str, object] | None = None, replace: bool = False) -> bool:
    """Write a cache entry atomically: arrays as NAME.npy, `description` as key.json, `extra` as NAME.json.
    `replace`: an entry already there is stale (other ids) and is replaced; else it is another rank's equal one,
    kept (returns False)."""
    folder = Path(cache_dir) / key
    tmp = temporary(folder)
    tmp.mkdir(parents=True)
    for name, array in arrays.items():
        if array is not None:
            np.save(tmp / f"{name}.npy", array)
    (tmp / "key.json").write_text(json.dumps(description, indent=2, default=str) + "\n")
    for name, value in (extra or {}).items():
        (tmp / f"{name}.json").write_text(json.dumps(value))
    return publish(tmp, folder, replace)


def publish(tmp: Path, folder: Path, replace: bool) -> bool:
    """Rename the whole temporary folder `tmp` to `folder`. `replace`: a folder already there is stale and is moved
    aside and removed first; else it is another writer's equal one, kept (`tmp` removed, returns False)."""
    if replace and folder.exists():
        old = temporary(folder)
        try:
            folder.rename(old)
            shutil.rmtree(old, ignore_errors=True)
            logger.info("replaced the stale cache entry %s", folder)
        except FileNotFoundError:  # another writer replaced it meanwhile
            pass
    try:
        tmp.rename(folder)
    except OSError:  # another rank wrote the same entry first; theirs is equal
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def save(cache_dir: str | Path, key: str, encoded: Encoded, description: dict, replace: bool = False) -> None:
    """Write `encoded` as entry `key` (`replace`: over a stale one); it then names the entry and its digest. When
    another rank's equal entry was there first, `encoded` takes that entry's digest, so hits this rank caches are
    found by a run that reads the entry (a digest of the same vectors encoded elsewhere may differ in the last bit)."""
    arrays = {name: getattr(encoded, name) for name in Encoded.ARRAYS}
    encoded.digest = content_digest(encoded.ids, arrays)
    folder = Path(cache_dir) / key
    if not save_arrays(cache_dir, key, arrays, description, {"ids": encoded.ids, "digest": encoded.digest}, replace):
        if (folder / "digest.json").is_file() and json.loads((folder / "ids.json").read_text()) == encoded.ids:
            encoded.digest = json.loads((folder / "digest.json").read_text())
    encoded.source = str(folder)


def drop_pages(*arrays) -> None:
    """Let the kernel unmap this process's resident pages of memory-mapped arrays (the page cache keeps them, so a
    later read is a cheap fault): a search over a memory-mapped corpus then holds one batch's rows, not the corpus."""
    for array in arrays:
        mapping = getattr(array, "_mmap", None)  # np.memmap's mmap object (np.load(mmap_mode="r"))
        if mapping is not None:
            mapping.madvise(mmap.MADV_DONTNEED)
