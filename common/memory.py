"""A process's own peak memory, for the benchmarks that report one.

It is VmHWM ("high water mark": peak resident set) from /proc/self/status. `getrusage().ru_maxrss` is not: it
survives exec, so a worker started by `subprocess` reports max(its parent's peak, its own). Checked: a parent
that had touched 1.9 GB started a bare `python -c`, whose ru_maxrss read 1.9 GB and VmHWM 11 MB (issue 36).
"""
from __future__ import annotations


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Process `pid`'s (default: this one's) peak resident set (VmHWM) in bytes; Linux only.

    OSError once the process is gone; RuntimeError for one without memory (a zombie has no VmHWM line)."""
    path = f"/proc/{pid}/status"
    with open(path, encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   12345 kB"
    raise RuntimeError(f"{path} has no VmHWM line: peak memory is read on Linux only")
