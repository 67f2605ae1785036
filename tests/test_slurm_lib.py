"""slurm/lib.sh's functions on their own, sourced by bash: no SLURM cluster needed."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "slurm" / "lib.sh"


def bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'source "{LIB}"\n{script}'], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60)


def test_the_rendezvous_port_is_outside_the_ephemeral_range_for_every_job_id():
    """The kernel gives ports of net.ipv4.ip_local_port_range (both ends included) to outgoing connections; the old
    20000 + id % 20000 fell inside the default 32768-60999 for 36 % of job ids. Over 3000 job ids, consecutive and
    random up to 2^32: never inside the range this machine has, and exactly 10000 + id % (first - 10000)."""
    first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random(0)
    ids = list(range(1000)) + list(range(4_000_000, 4_001_000)) + [rng.randrange(2**32) for _ in range(1000)]
    done = bash(f'for id in {" ".join(map(str, ids))}; do unset MASTER_PORT; SLURM_JOB_ID=$id rendezvous '
                f'>/dev/null || exit 1; echo "$MASTER_PORT"; done', MASTER_ADDR="node1", SLURM_NTASKS="2")
    assert done.returncode == 0, done.stderr
    ports = list(map(int, done.stdout.split()))
    assert len(ports) == len(ids) and not any(first <= port <= last for port in ports)
    if first - 10000 >= 1000:
        assert ports == [10000 + i % (first - 10000) for i in ids]


@pytest.mark.parametrize("first, last, expected", [
    (32768, 60999, [10000, 10001, 32767, 10000]),  # Linux's default: below it
    (40000, 60999, [10000, 10001, 39999, 10000]),
    (10500, 60999, [61000, 61001, 65535, 61000]),  # under 1000 ports below: above it
    (1024, 65000, None),  # no room either side: MASTER_PORT must be set
])
def test_job_port_below_or_above_the_range(first, last, expected):
    size = first - 10000 if first - 10000 >= 1000 else 65535 - last
    done = bash(f"for id in 0 1 {size - 1} {size}; do job_port $id {first} {last} || echo none; done")
    assert done.stdout.split() == ([str(port) for port in expected] if expected else ["none"] * 4)


def test_a_port_set_by_the_user_is_kept():
    done = bash('rendezvous >/dev/null; echo "$MASTER_ADDR:$MASTER_PORT"', MASTER_ADDR="node7", MASTER_PORT="45678",
                SLURM_JOB_ID="123", SLURM_NTASKS="2")
    assert done.stdout.split() == ["node7:45678"]
