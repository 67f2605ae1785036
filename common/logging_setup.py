"""One log format for every stage; only rank 0 speaks at INFO so multi-GPU logs stay readable."""
from __future__ import annotations

import logging
import os

from common.quiet_log import silence_known_notices

_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def setup_logging(rank: int | None = None) -> None:
    """Configure the root logger once; non-zero ranks log warnings and errors only; the library notices nobody
    can act on (common/quiet_log.py) are dropped."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = _FORMAT if rank == 0 else f"%(asctime)s %(levelname)s [rank {rank}] [%(name)s] %(message)s"
    logging.basicConfig(level=level, format=fmt, force=True)
    silence_known_notices()
    # every rank says where it meets the others and over which interface (common/distributed.py)
    logging.getLogger("common.distributed").setLevel(logging.INFO)
