"""Run the demo's stages as subprocesses: output streamed with a stage prefix, a log per stage, reuse of
finished stages, and a failure that names the stage and the log to read."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_MARKER = ".demo_stage.json"


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message says which and where its log is."""


@dataclass
class Stage:
    name: str  # short label shown in the output and the results table
    command: list[str]  # argv; "python" means this interpreter
    output: Path  # the folder the stage fills; its marker makes a re-run reuse it
    env: dict[str, str] = field(default_factory=dict)  # extra environment for this stage


def _argv(command: list[str]) -> list[str]:
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "deepspeed":  # the launcher of this environment, not whatever is first on PATH
        return [str(Path(sys.executable).with_name("deepspeed")), *command[1:]]
    return command


def run_stage(stage: Stage, log_dir: Path) -> float:
    """Run one stage (or reuse it when its marker records the same command); return its seconds."""
    marker = stage.output / _MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("command") == stage.command:
            logger.info("[%s] reusing finished output in %s (took %.0f s)", stage.name, stage.output, done["seconds"])
            return float(done["seconds"])
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
    marker.write_text(json.dumps({"command": stage.command, "seconds": seconds}) + "\n")
    logger.info("[%s] done in %.0f s", stage.name, seconds)
    return seconds
