"""common.memory: a worker's peak memory is its own, not its parent's (issue 36)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.memory import peak_rss_bytes

REPO = Path(__file__).resolve().parents[1]

PARENT = """
import json, resource, subprocess, sys
held = bytearray(400 << 20)  # the parent touches 400 MiB
held[::4096] = b"x" * len(held[::4096])
child = "import json, resource; from common.memory import peak_rss_bytes; " \\
        "own = bytearray(50 << 20); own[::4096] = b'x' * len(own[::4096]); " \\
        "print(json.dumps([peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def test_a_child_reports_its_own_peak_not_its_parents():
    done = subprocess.run([sys.executable, "-c", PARENT], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=True)
    own, maxrss = json.loads(done.stdout)
    assert maxrss >= 400 << 20  # ru_maxrss carried the parent's 400 MiB through exec
    assert 50 << 20 <= own < 150 << 20, own  # VmHWM: the child's 50 MiB plus a bare interpreter


def test_another_process_peak_is_read_by_its_pid():
    child = ("import json, sys; from common.memory import peak_rss_bytes; own = bytearray(50 << 20); "
             "own[::4096] = b'x' * len(own[::4096]); print(json.dumps(peak_rss_bytes()), flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", child], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    own = json.loads(process.stdout.readline())
    assert peak_rss_bytes(process.pid) == own and own >= 50 << 20  # the child's own figure, read from outside
    process.communicate("")
    with pytest.raises(OSError):  # gone
        peak_rss_bytes(process.pid)
