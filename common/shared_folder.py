"""Every rank must see one output folder: checkpoints are written by all ranks and read back by all on resume.

A folder on node-local storage (scratch, /tmp, a mount only some nodes have) looks fine until the first resume,
when a rank finds another rank's checkpoint files missing; the check makes it a start-up error instead, before
any step: each rank writes a token file there, and after a barrier reads every other rank's.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from common.distributed import DistributedSetupError

_CHECK_DIR = ".shared-check"


def check_shared_folder(folder: str | os.PathLike, rank: int, world_size: int) -> None:
    """Returns when every rank sees every other rank's file in `folder`; otherwise raises DistributedSetupError,
    the same one line on every rank, naming the folder and which ranks (on which hosts) miss whose files."""
    if world_size == 1:
        return
    check = Path(folder) / _CHECK_DIR
    check.mkdir(parents=True, exist_ok=True)
    mine = check / f"rank-{rank}"
    token = secrets.token_hex(8)  # fresh per run: a file left by an earlier run is not taken as seen
    mine.write_text(token)
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, (socket.gethostname(), token))  # also the barrier: every file is written
    unseen = []
    for other, (_, expected) in enumerate(everyone):
        try:
            seen = (check / f"rank-{other}").read_text() == expected
        except OSError:
            seen = False
        if not seen:
            unseen.append(other)
    missing: list = [None] * world_size
    dist.all_gather_object(missing, unseen)  # every rank has read the others' files before any is removed
    mine.unlink(missing_ok=True)
    try:
        check.rmdir()  # succeeds for the last rank to remove its file
    except OSError:
        pass
    if any(missing):
        hosts = [host for host, _ in everyone]
        problems = "; ".join(f"rank {r} ({hosts[r]}) cannot see the files of rank(s) "
                             f"{', '.join(f'{o} ({hosts[o]})' for o in others)}"
                             for r, others in enumerate(missing) if others)
        raise DistributedSetupError(f"output folder {Path(folder).resolve()} is not shared by all ranks: {problems}; "
                                    f"put it on a filesystem that every node mounts")
