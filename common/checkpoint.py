"""Checkpoints that resume a run exactly, a crash-safe `latest` pointer, and the last-K retention.

A checkpoint is DeepSpeed's folder `OUT/checkpoints/step-NNNNNNNN/` (every module, the ZeRO-partitioned
optimizer, the scheduler) plus the stage's train state in its client state (pre-training: the step and the
data loader's position, its masks and dropout being seeded from (seed, rank, step); fine-tuning: the data
position) and, where a stage needs it, one file of per-rank state (fine-tuning's RNG states).
Every rank fsyncs the files it wrote and the folder (a node lost right after a save on Lustre or NFS must not
take a part of it from the cache); once every rank has, rank 0 writes the number of ranks (`ranks.json`) and
records each file's size in the folder's `checkpoint_files.json`, then replaces `latest` atomically (DeepSpeed's
own `latest` is written before the other ranks are done): `latest` names the newest *complete* checkpoint in
DeepSpeed's own format (one line, the tag), so a crash or SIGKILL mid-save leaves the previous one in charge. A
step folder newer than `latest` is such an unfinished save: `--resume auto` never picks it, the next save removes
it (so it never counts as one of the last K), and a resume checks its checkpoint's files against the record
(every rank's file present, sizes as written) and the number of ranks that wrote it against this run's.

A save that cannot fit says so before writing anything: every rank compares the free space of the
checkpoint folder with the size of the last checkpoint (an estimate from the parameter count before the
first). A write that fails anyway (a full disk, a quota) removes the partial folder on every rank. Either
way every rank raises the same one-line CheckpointSaveError and `latest` stays where it was.
"""
from __future__ import annotations

import errno
import json
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
FILES = "checkpoint_files.json"
#: The number of ranks that wrote a checkpoint, recorded by rank 0 (checkpoints without it: counted from file names).
RANKS = "ranks.json"
_TAG = re.compile(r"^step-(\d+)$")
#: The files one rank alone writes: DeepSpeed's ZeRO partition ((bf16_)zero_pp_rank_R_mp_rank_00_optim_states.pt,
#: ZeRO-3's model states too), fine-tuning's RNG states (rank-R-state.pt). Rank 0 writes the other files.
_RANK_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_mp_rank_\d+_(?:optim|model)_states|^rank-(\d+)-state)\.pt$")
_MB = 1 << 20
#: Bytes per trainable parameter that AdamW adds to a checkpoint: fp32 master weight and two moments.
_OPTIMIZER_BYTES = 12


class CheckpointSaveError(RuntimeError):
    """A checkpoint that did not fit or failed to write; raised on every rank with the same line."""


class ResumeWorldSizeError(ValueError):
    """A checkpoint written by another number of ranks: ZeRO splits the optimizer state by rank and each rank
    owns its share of the data and its random streams, so it resumes only on the world size that saved it."""


def _rank_file(rank: int) -> str:
    return f"rank-{rank}-state.pt"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def read_latest(checkpoint_dir: Path) -> str | None:
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def _fsync(path: Path) -> None:
    """Flush `path` (a file, or a folder's entries) to storage: a filesystem that caches writes on the client
    (Lustre, NFS) may otherwise lose them with the node, after `latest` already names them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself


def _step_of(tag: str | None) -> int:
    return int(_TAG.match(tag).group(1)) if tag and _TAG.match(tag) else -1


def _recorded(folder: Path) -> dict[str, int]:
    """The record of a complete checkpoint: each file's path in the folder and its size."""
    return json.loads((folder / FILES).read_text())


def _recorded_bytes(folder: Path) -> int:
    return sum(_recorded(folder).values())


def verify_checkpoint(folder: Path, flag: str) -> None:
    """Raise FileNotFoundError unless every file recorded when `folder` was saved is there with its size."""
    if not (folder / FILES).is_file():
        raise FileNotFoundError(f"{flag} {folder}: an incomplete checkpoint (no {FILES}: its save never finished)")
    for name, size in _recorded(folder).items():
        path = folder / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise FileNotFoundError(f"{flag} {folder}: an incomplete checkpoint ({name}: {found}, {size} written)")


def saved_world_size(folder: Path) -> int | None:
    """How many ranks wrote the complete checkpoint `folder`: its ranks.json; in a checkpoint saved before that
    was recorded, counted from the files each rank writes of its own (None when there is none, as under ZeRO
    stage 0 in pre-training)."""
    if (folder / RANKS).is_file():
        return json.loads((folder / RANKS).read_text())["world_size"]
    ranks = [int(a or b) for a, b in (m.groups() for m in map(_RANK_FILE.search, _recorded(folder)) if m)]
    return max(ranks) + 1 if ranks else None


def resolve_resume(resume: str | None, checkpoint_dir: Path, flag: str = "--resume", *,
                   world_size: int) -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None to start fresh. `auto` tolerates no checkpoint; a path must exist.
    The checkpoint found must be complete (see verify_checkpoint) and written by `world_size` ranks, checked
    before DeepSpeed reads it (its own check raises a traceback on every rank)."""
    if resume is None:
        return None
    path = Path(resume)
    if resume == "auto":
        tag = read_latest(checkpoint_dir)
        if tag is None:
            return None
        found = checkpoint_dir, tag
    elif (path / LATEST).is_file():  # a checkpoints folder
        found = path, read_latest(path)
    elif path.is_dir() and _TAG.match(path.name):  # one checkpoint
        found = path.parent, path.name
    else:
        raise FileNotFoundError(f"{flag} {resume}: neither a checkpoint folder (step-N) nor a folder with "
                                f"a '{LATEST}' file")
    folder = found[0] / found[1]
    verify_checkpoint(folder, flag)
    saved = saved_world_size(folder)
    if saved is not None and saved != world_size:
        raise ResumeWorldSizeError(f"{flag} {folder}: written by {saved} rank{'s' * (saved != 1)}, this run has "
                                   f"{world_size}; a checkpoint resumes only on the number of ranks that wrote it "
                                   "(ZeRO splits the optimizer state and the data by rank)")
    return found


def _write_cause(exc: BaseException, folder: Path) -> str:
    """What made a write fail, in words: the errno where one survives; torch's zip writer drops it (a full disk
    reads "unexpected pos"), so a filesystem left with under 1 MB is named as full."""
    cause = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    free = shutil.disk_usage(folder.parent).free
    if free < _MB:
        return f"{os.strerror(errno.ENOSPC).lower()} ({free / _MB:.1f} MB free)"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class Checkpointer:
    """Saves and loads through a DeepSpeed engine; rank 0 owns the record, the pointer and the pruning."""

    def __init__(self, checkpoint_dir: str | Path, *, save_total_limit: int | None, rank: int):
        self.dir, self.limit, self.rank = Path(checkpoint_dir), save_total_limit, rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, engine, step: int, train_state: dict, rank_state: dict | None = None) -> Path:
        """Every rank calls this; rank_state (optional) is this rank's own, saved beside the DeepSpeed files."""
        folder = self.dir / tag_for(step)
        check_finite_weights(engine.module, f"checkpoint {folder}", engine.device)
        self._require_space(engine, folder, step)
        if self.rank == 0:
            self._remove_unfinished(keep=folder.name)
        failure = self._write(engine, folder, train_state, rank_state)
        failures = [failure]
        if dist.is_initialized():
            failures = [None] * dist.get_world_size()
            dist.all_gather_object(failures, failure)  # also: every rank's files are on disk before `latest` moves
        failed = [(rank, cause) for rank, cause in enumerate(failures) if cause is not None]
        if failed:
            shutil.rmtree(folder, ignore_errors=True)  # every rank: node-local folders too
            if dist.is_initialized():
                dist.barrier()
            rank, cause = failed[0]
            raise CheckpointSaveError(f"checkpoint {folder} (step {step}) could not be written on rank {rank}: "
                                      f"{cause}; removed it, {self.dir / LATEST} still names "
                                      f"{read_latest(self.dir) or 'no checkpoint'}")
        if self.rank == 0:
            _write_atomically(folder / RANKS, json.dumps({"world_size": engine.world_size}) + "\n")
            sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
            _write_atomically(folder / FILES, json.dumps(sizes, indent=1) + "\n")
            _write_atomically(self.dir / LATEST, folder.name)
            self._prune(keep=folder.name)
        if dist.is_initialized():
            dist.barrier()
        logger.info("saved checkpoint %s", folder)
        return folder

    def _require_space(self, engine, folder: Path, step: int) -> None:
        """Raise (on every rank alike) when the smallest free space of the ranks' checkpoint folders is below the
        last checkpoint's size, or before the first, its weights plus AdamW's 12 bytes per trainable parameter."""
        latest = read_latest(self.dir)
        if latest is not None and (self.dir / latest / FILES).is_file():
            needed, basis = _recorded_bytes(self.dir / latest), f"the size of {latest}"
        else:
            params = list(engine.module.parameters())
            needed = sum(p.numel() * (p.element_size() + _OPTIMIZER_BYTES * p.requires_grad) for p in params)
            basis = "estimated from the parameters"
        free = shutil.disk_usage(self.dir).free
        if dist.is_initialized():
            both = torch.tensor([free, -needed], dtype=torch.int64, device=engine.device)
            dist.all_reduce(both, op=dist.ReduceOp.MIN)
            free, needed = both[0].item(), -both[1].item()
        if free < needed:
            previous = f"the previous checkpoint {latest} is intact" if latest else "no checkpoint was saved before"
            raise CheckpointSaveError(
                f"not saving checkpoint {folder} (step {step}): {free / _MB:.1f} MB free in {self.dir}, "
                f"{needed / _MB:.1f} MB needed ({basis}); {previous}")

    def _write(self, engine, folder: Path, train_state: dict, rank_state: dict | None) -> str | None:
        """DeepSpeed's files and this rank's own; None when written, else the cause (this rank's collectives stay
        in step with the ranks that wrote: a failed DeepSpeed save still joins the barrier that ends one)."""
        try:
            try:
                engine.save_checkpoint(str(self.dir), tag=folder.name, client_state={"train_state": train_state},
                                       save_latest=False)
            except (OSError, RuntimeError) as exc:
                if dist.is_initialized() and not isinstance(exc, dist.DistError):
                    dist.barrier()
                raise
            if rank_state is not None:
                torch.save(rank_state, folder / _rank_file(self.rank))
            self._sync_own_files(folder)
        except (OSError, RuntimeError) as exc:
            if isinstance(exc, dist.DistError):  # a failed collective is not a failed write
                raise
            return _write_cause(exc, folder)
        return None

    def _sync_own_files(self, folder: Path) -> None:
        """fsync the files this rank wrote (its own by name; rank 0 the shared ones) and the folder, before the
        all-gather after which `latest` may name them: no rank's part of a checkpoint lives only in a cache."""
        for path in sorted(folder.rglob("*")):
            match = _RANK_FILE.search(path.name)
            owner = int(match.group(1) or match.group(2)) if match else 0
            if path.is_file() and owner == self.rank:
                _fsync(path)
        _fsync(folder)

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

    def _tags(self) -> list[str]:
        return sorted((p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.match(p.name)), key=_step_of)

    def _remove_unfinished(self, keep: str) -> None:
        """Step folders newer than `latest` are saves that never finished (this save's own folder is rewritten)."""
        newest = _step_of(read_latest(self.dir))
        for tag in self._tags():
            if _step_of(tag) > newest and tag != keep:
                logger.warning("removing %s: an unfinished save (newer than %s)", self.dir / tag, self.dir / LATEST)
                shutil.rmtree(self.dir / tag, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Keep the last `limit` complete checkpoints (those with their record of files)."""
        if self.limit is None:
            return
        complete = [tag for tag in self._tags() if (self.dir / tag / FILES).is_file()]
        stale = [t for t in complete if t != keep][: max(0, len(complete) - self.limit)]
        for tag in stale:
            shutil.rmtree(self.dir / tag, ignore_errors=True)
