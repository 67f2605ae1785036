"""metrics.jsonl after a resume: one line per logged step, never a step twice.

A run killed after logging steps past its last checkpoint left lines that the resumed run logs again; both
stages drop them first, so the file reads as one uninterrupted run. A SIGKILL mid-write can also cut the last
line short: it is dropped with a warning (its step is past the checkpoint and gets logged again), since an
error here, on rank 0 alone, would leave the other ranks waiting in their next collective.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def keep_steps_up_to(path: Path, step: int) -> None:
    """Keep only the lines of `path` at or before `step` (the step a run resumes from; 0 for a fresh start)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append((line, json.loads(line)))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON line; move the file away to resume") from None
            logger.warning("%s: dropping its last line, cut short by a crash: %.80s", path, line)
    path.write_text("".join(line + "\n" for line, record in records if record.get("step", 0) <= step))
