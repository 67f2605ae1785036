"""Checkpoints that resume a run exactly, a crash-safe `latest` pointer, and the last-K retention.

A checkpoint is DeepSpeed's folder `OUT/checkpoints/step-NNNNNNNN/` (every module, the ZeRO-partitioned
optimizer, the scheduler) plus the stage's train state in its client state (pre-training: the step and the
data loader's position, its masks and dropout being seeded from (seed, rank, step); fine-tuning: the data
position) and, where a stage needs it, one file of per-rank state (fine-tuning's RNG states).
`latest` names the newest *complete* checkpoint in DeepSpeed's own format (one line, the tag), replaced
atomically after every rank finished writing (DeepSpeed's own `latest` is written before the other ranks
are done), so a crash or SIGKILL mid-save leaves the previous one in charge. A step folder newer than
`latest` is such an unfinished save: `--resume auto` never picks it, an explicit path to it is refused, and
saving that step again overwrites it.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from common.nonfinite import check_finite_weights

logger = logging.getLogger(__name__)

LATEST = "latest"
_TAG = re.compile(r"^step-(\d+)$")


def _rank_file(rank: int) -> str:
    return f"rank-{rank}-state.pt"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def read_latest(checkpoint_dir: Path) -> str | None:
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def _write_latest(checkpoint_dir: Path, tag: str) -> None:
    tmp = checkpoint_dir / f".{LATEST}.tmp"
    with open(tmp, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint_dir / LATEST)


def _step_of(tag: str | None) -> int:
    return int(_TAG.match(tag).group(1)) if tag and _TAG.match(tag) else -1


def resolve_resume(resume: str | None, checkpoint_dir: Path, flag: str = "--resume") -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None to start fresh. `auto` tolerates no checkpoint; a path must exist
    and be complete (not newer than its folder's `latest`)."""
    if resume is None:
        return None
    if resume == "auto":
        tag = read_latest(checkpoint_dir)
        return (checkpoint_dir, tag) if tag else None
    path = Path(resume)
    if (path / LATEST).is_file():  # a checkpoints folder
        return path, read_latest(path)
    if path.is_dir() and _TAG.match(path.name):  # one checkpoint
        if _step_of(path.name) > _step_of(read_latest(path.parent)):
            raise FileNotFoundError(f"{flag} {resume}: an incomplete checkpoint (newer than {path.parent / LATEST}, "
                                    "so its save never finished)")
        return path.parent, path.name
    raise FileNotFoundError(f"{flag} {resume}: neither a checkpoint folder (step-N) nor a folder with "
                            f"a '{LATEST}' file")


class Checkpointer:
    """Saves and loads through a DeepSpeed engine; rank 0 owns the pointer and the pruning."""

    def __init__(self, checkpoint_dir: str | Path, *, save_total_limit: int | None, rank: int):
        self.dir, self.limit, self.rank = Path(checkpoint_dir), save_total_limit, rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, engine, step: int, train_state: dict, rank_state: dict | None = None) -> Path:
        """Every rank calls this; rank_state (optional) is this rank's own, saved beside the DeepSpeed files."""
        tag = tag_for(step)
        check_finite_weights(engine.module, f"checkpoint {self.dir / tag}", engine.device)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"train_state": train_state}, save_latest=False)
        if rank_state is not None:
            torch.save(rank_state, self.dir / tag / _rank_file(self.rank))
        if dist.is_initialized():
            dist.barrier()  # every rank's files are on disk before `latest` moves
        if self.rank == 0:
            _write_latest(self.dir, tag)
            self._prune(keep=tag)
        if dist.is_initialized():
            dist.barrier()
        logger.info("saved checkpoint %s", self.dir / tag)
        return self.dir / tag

    def load(self, engine, load_dir: Path, tag: str) -> dict:
        path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None or "train_state" not in (client_state or {}):
            raise FileNotFoundError(f"{load_dir / tag}: not a complete checkpoint of this stage")
        logger.info("resumed from %s", path)
        return client_state["train_state"]

    def load_rank_state(self, load_dir: Path, tag: str) -> dict:
        path = load_dir / tag / _rank_file(self.rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a checkpoint written by fewer ranks?)")
        return torch.load(path, weights_only=False)

    def _prune(self, keep: str) -> None:
        if self.limit is None:
            return
        tags = sorted((p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.match(p.name)),
                      key=lambda name: int(_TAG.match(name).group(1)))
        stale = [t for t in tags if t != keep][: max(0, len(tags) - self.limit)]
        for tag in stale:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
