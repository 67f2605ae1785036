"""What a training run was, written beside it: enough to tell two runs apart and to run one again.

One JSON per start of a run, `OUT/provenance/step-N.json` (N: the step it started from, 0 for a fresh run, the
checkpoint's step for a resume), written by rank 0 before the first step; the trackers of `--report_to` get the
same dict (common/tracking.py). It holds
- `config`: every option as resolved, defaults included;
- `deepspeed`: the DeepSpeed JSON as the engine got it ("auto" fields filled);
- `git`: the code's commit and whether tracked files differ from it (None outside a git checkout);
- `packages`: the versions of python, torch, deepspeed, transformers and the rest that shape the numbers;
- `hardware`: CPU model and flags, GPU names and count, the world size;
- `data`: the SHA-256 of the data's manifest.json (preprocessing output), or of each input file for a BEIR folder;
  `data_files` the path, size, mtime, inode and ctime each was hashed at. A resume takes a hash from the run's
  newest earlier provenance file when all of those are unchanged (a corpus of gigabytes is hashed once a run, not
  at every start while the other ranks wait); size and mtime alone are not enough, as in
  pretrain/shard_integrity.py: `cp -p` and `rsync -a` restore the mtime, but a write gives a new ctime.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from common.precision import cpu_flags

FOLDER = "provenance"
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dupmae", "torch", "deepspeed", "transformers", "sentence-transformers", "numpy", "apache-beam",
            "wandb", "mlflow", "tensorboard")
_CHUNK = 1 << 20


def record(rank: int, output_dir: str | Path, step: int, *, config: dict, deepspeed: dict | None,
           data_files: dict[str, Path], world_size: int) -> dict:
    """Rank 0: collect the provenance and write OUT/provenance/step-N.json; returns it ({} on other ranks)."""
    if rank != 0:
        return {}
    provenance = collect(config, deepspeed, data_files, world_size, earlier=newest(output_dir))
    write(provenance, output_dir, step)
    return provenance


def collect(config: dict, deepspeed: dict | None, data_files: dict[str, Path], world_size: int,
            earlier: dict | None = None) -> dict:
    """The provenance dict; `data_files` names the inputs to hash ({"manifest.json": path} where there is one);
    `earlier`: a previous start's provenance, whose hashes are kept for files unchanged since."""
    stats = {name: file_stat(path) for name, path in data_files.items()}
    hashed_before = (earlier or {}).get("data_files", {})
    data = {}
    for name, path in data_files.items():
        if stats[name] is None:
            data[name] = None
        elif hashed_before.get(name) == stats[name]:  # unchanged since an earlier start hashed it
            data[name] = earlier["data"][name]
        else:
            data[name] = file_sha256(Path(path))
    return {"config": config, "deepspeed": deepspeed, "git": git_state(REPO), "packages": package_versions(),
            "hardware": hardware(world_size), "data": data, "data_files": stats,
            "command": [sys.executable, *sys.argv]}


def file_stat(path: str | Path) -> dict | None:
    """What a hash is reused on: the resolved path, size, mtime, inode and ctime (None: no such file)."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
            "ctime_ns": stat.st_ctime_ns}


def newest(output_dir: str | Path) -> dict | None:
    """The provenance of the run's latest earlier start (by step), if any can be read."""
    files = sorted((f for f in (Path(output_dir) / FOLDER).glob("step-*.json") if f.stem[5:].isdigit()),
                   key=lambda f: int(f.stem[5:]))
    try:
        return json.loads(files[-1].read_text()) if files else None
    except (OSError, ValueError):
        return None


def write(provenance: dict, output_dir: str | Path, step: int) -> Path:
    """OUT/provenance/step-N.json (a resumed run adds its own file; the first start's stays)."""
    path = Path(output_dir) / FOLDER / f"step-{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(provenance, indent=1, default=str) + "\n")
    return path


def git_state(repo: Path) -> dict:
    """{"commit", "dirty"} of the checkout holding this code; None for both outside a git checkout (an install)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # an install inside some other checkout is not that checkout's code
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == repo.resolve() else None
    if commit is None:
        return {"commit": None, "dirty": None}
    changed = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if changed is None else bool(changed)}


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def hardware(world_size: int) -> dict:
    """This node's CPU and GPUs (rank 0's node: the nodes of a job are alike) and the run's world size."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [torch.cuda.get_device_name(i) for i in range(count)]
    return {"cpu_model": _cpu_model(), "cpu_flags": sorted(cpu_flags()), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu_names": gpus, "gpu_count": len(gpus), "world_size": world_size, "host": socket.gethostname()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks (pre-training's shard check uses it too: pretrain/shard_integrity.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
