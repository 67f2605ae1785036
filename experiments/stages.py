"""Run an experiment's stages as subprocesses: output streamed with a stage prefix, a log per stage, reuse of
finished stages, and a failure that names the stage and the log to read.

A finished stage is reused only when its command AND its inputs are unchanged: `Stage.inputs` names the folders or
files it reads (an upstream stage's output, a dataset), and the marker records their fingerprints. A re-run
upstream stage writes a new marker (with a new run id), so everything downstream of it runs again, even though
the downstream command, which names only the upstream folder, is the same.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = ".stage.json"
#: Files up to this size are identified by their contents; larger ones by size and modification time.
_HASHED_BYTES = 1 << 30


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message says which and where its log is."""


@dataclass
class Stage:
    name: str  # short label shown in the output and the results table
    command: list[str]  # argv; "python" means this interpreter
    output: Path  # the folder the stage fills; its marker makes a re-run reuse it
    env: dict[str, str] = field(default_factory=dict)  # extra environment for this stage
    inputs: tuple[Path, ...] = ()  # what the stage reads: a change in any re-runs it


def fingerprint(path: Path) -> str:
    """What identifies a stage input: a stage output's marker (its command and run id), else a hash of the file,
    or of a folder's files (names, sizes and contents; files over 1 GiB by size and mtime). Contents, not mtimes:
    a data file rewritten with the same text (the smoke data, a re-extracted corpus) must not re-run everything
    downstream of it."""
    path = Path(path)
    marker = path / MARKER if path.is_dir() else None
    if marker is not None and marker.is_file():
        return hashlib.sha256(marker.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}".encode())
        if stat.st_size < _HASHED_BYTES:
            with open(file, "rb") as handle:  # streamed: a corpus or weights of up to 1 GiB never sit in memory
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()


def _argv(command: list[str]) -> list[str]:
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "deepspeed":  # the launcher of this environment, not whatever is first on PATH
        return [str(Path(sys.executable).with_name("deepspeed")), *command[1:]]
    return command


def run_stage(stage: Stage, log_dir: Path) -> float:
    """Run one stage (or reuse it when its marker records the same command and inputs); return its seconds."""
    marker = stage.output / MARKER
    inputs = {str(path): fingerprint(path) for path in stage.inputs}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("command") == stage.command and done.get("inputs") == inputs:
            logger.info("[%s] reusing finished output in %s (took %.0f s)", stage.name, stage.output, done["seconds"])
            return float(done["seconds"])
        logger.info("[%s] %s changed since the last run: running again", stage.name,
                    "the command" if done.get("command") != stage.command else "an input")
    if stage.output.exists():  # a half-finished earlier attempt, or other options: start clean
        shutil.rmtree(stage.output)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage.name}.log"
    logger.info("[%s] running: %s  (log: %s)", stage.name, " ".join(stage.command), log_path)
    start = time.time()
    # TQDM_MININTERVAL: progress bars print a line every few seconds, not a flood, when piped.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5", **stage.env}
    with open(log_path, "w") as log:
        process = subprocess.Popen(_argv(stage.command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=env, text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(f"[{stage.name}] {line}")
        code = process.wait()
    seconds = time.time() - start
    if code != 0:
        raise StageFailed(f"stage '{stage.name}' failed with exit code {code}; read {log_path}")
    stage.output.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"command": stage.command, "inputs": inputs, "seconds": seconds,
                                  "run_id": uuid.uuid4().hex}) + "\n")
    logger.info("[%s] done in %.0f s", stage.name, seconds)
    return seconds
