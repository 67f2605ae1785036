"""How a run ends on a fault it was built for: an exit code and one error line on each rank, never a traceback.

Both stages map the same exceptions: 3 for --max_consecutive_nonfinite skipped steps in a row or a NaN/inf weight
at a checkpoint, 4 for a checkpoint that did not fit or failed to write, 5 for a collective that failed, mostly
a rank that stopped answering for --ddp_timeout seconds (the other ranks then see their peer gone). Under a
launcher (deepspeed, torchrun, srun --kill-on-bad-exit) the first rank to exit non-zero ends the others.
"""
from __future__ import annotations

import re
import traceback

import torch.distributed as dist

from common.checkpoint import CheckpointSaveError
from common.nonfinite import NonFiniteError

_C10D = "distributed_c10d.py"
_SOURCE_PREFIX = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../unbound_buffer.cc:78] "


def collective_failure(exc: BaseException, timeout_s: int) -> str | None:
    """The line for an exception raised inside a torch.distributed collective (None for any other): the
    collective, this rank, torch's own first line, and in a world of two the rank that did not arrive (gloo's
    timeout names neither the collective nor the peer)."""
    names = [frame.name for frame in traceback.extract_tb(exc.__traceback__)
             if frame.filename.endswith(_C10D) and frame.name != "wrapper"]
    if not names or not dist.is_initialized():
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    said = _SOURCE_PREFIX.sub("", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
    missing = f"; rank {1 - rank} did not arrive" if world == 2 and "timed out" in said.lower() else ""
    return (f"collective {names[-1]} failed on rank {rank} of {world} (--ddp_timeout {timeout_s} s){missing}: "
            f"{said}")


def exit_code(exc: BaseException, timeout_s: int) -> tuple[int, str] | None:
    """(exit code, error line) for a fault a run ends on by design; None for anything else (a bug: let it raise)."""
    if isinstance(exc, NonFiniteError):  # the same step on every rank; every checkpoint on disk is finite
        return 3, str(exc)
    if isinstance(exc, CheckpointSaveError):  # the same line on every rank; `latest` untouched
        return 4, str(exc)
    line = collective_failure(exc, timeout_s)
    return None if line is None else (5, line)
