"""metrics.jsonl after a resume: one line per logged step, never a step twice.

A run killed after logging steps past its last checkpoint left lines that the resumed run logs again; both
stages drop them first, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path


def keep_steps_up_to(path: Path, step: int) -> None:
    """Keep only the lines of `path` at or before `step` (the step a run resumes from; 0 for a fresh start)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
