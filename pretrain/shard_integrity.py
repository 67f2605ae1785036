"""Shard integrity: every shard's sha256 against manifest.json, once per run, split across the ranks.

Opening the shards (`pretrain.data`) always checks size and schema: an Arrow IPC file ends with its footer,
so a truncated or extended copy does not open, and each shard must hold the manifest's columns and rows. A
flipped byte inside a record batch passes both, and memory-mapped reads never notice it. So before the first
step rank r hashes shards r, r + W, r + 2W, ... (the reads run in parallel across ranks and nodes), the
ranks exchange their findings in one all-gather, and every rank stops with the same one-line error naming
the first bad shard. Rank 0 then records the verification in OUT/shards_verified.json (the data folder, the
manifest's hash, each shard's expected sha256, size, mtime, inode and ctime); a resumed run whose rank 0 finds the
same record skips the hashing, and any change to those (a shard copied again, another data folder) hashes
everything again. Size and mtime alone are not enough: `cp -p` and `rsync -a` restore the mtime of a copy whose
bytes differ, but a write or a copy always gives the file a new ctime (which no user call can set back), and a
copy a new inode. Rank 0
alone decides and broadcasts it: other ranks may see other paths and mtimes (node-local copies) or no OUT at
all, and a rank deciding on its own would skip while the others wait in the all-gather.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist

from common.provenance import file_sha256
from common.shard_format import MANIFEST_NAME, Manifest
from pretrain.data import DataError

logger = logging.getLogger(__name__)

VERIFIED_FILE = "shards_verified.json"


def _fingerprint(folder: Path, manifest: Manifest) -> dict:
    """What a verification vouches for: the folder, the manifest's bytes, each shard's expected sha256 and its
    file's size, mtime, inode and ctime (see the module docstring)."""
    stats = {info.file: (info.sha256, os.stat(folder / info.file)) for info in manifest.shards}
    return {"data_dir": str(folder.resolve()),
            "manifest_sha256": hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest(),
            "shards": {name: [sha256, stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
                       for name, (sha256, stat) in stats.items()}}


def _first_mismatch(folder: Path, manifest: Manifest, rank: int, world_size: int) -> tuple[int, str] | None:
    """(shard index, error line) of this rank's first shard whose sha256 differs from the manifest's."""
    for index in range(rank, len(manifest.shards), world_size):
        info = manifest.shards[index]
        actual = file_sha256(folder / info.file)
        if actual != info.sha256:
            return index, (f"{folder / info.file}: sha256 {actual[:16]}... differs from {MANIFEST_NAME}'s "
                           f"{info.sha256[:16] or '(none)'}...: the shard is corrupt (a changed byte or a bad "
                           "copy); copy it again or rerun preprocessing")
    return None


def verify_shards(data_dir: str | Path, manifest: Manifest, output_dir: str | Path, *, rank: int,
                  world_size: int) -> None:
    """Hash this rank's share of the shards unless OUT records a verification of the same files; a mismatch
    anywhere raises the same DataError on every rank (every rank must call this)."""
    folder, record = Path(data_dir), Path(output_dir) / VERIFIED_FILE
    fingerprint = _fingerprint(folder, manifest)
    decision = [rank == 0 and record.is_file() and json.loads(record.read_text()) == fingerprint]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[0]:
        logger.info("shards verified earlier (%s on rank 0): not hashing them again", record)
        return
    started = time.perf_counter()
    total = sum(size for _, size, *_ in fingerprint["shards"].values())
    logger.info("verifying the sha256 of %d shards (%.1f GB) across %d rank(s); --no_verify_shards skips this",
                len(manifest.shards), total / 1e9, world_size)
    mine = _first_mismatch(folder, manifest, rank, world_size)
    findings = [mine]
    if dist.is_initialized() and world_size > 1:
        findings = [None] * world_size
        dist.all_gather_object(findings, mine)
    bad = sorted(f for f in findings if f is not None)
    if bad:
        raise DataError(bad[0][1])
    if rank == 0:
        tmp = record.with_name(f".{VERIFIED_FILE}.tmp")
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
        os.replace(tmp, record)
    logger.info("all %d shards match manifest.json's sha256 (%.0f s)", len(manifest.shards),
                time.perf_counter() - started)
