"""common.host_allocator: training processes get torch's page-aligned, huge-page CPU allocations."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Runs the setup named by argv[1], then prints the offset of a fresh 4 MiB tensor within its page.
PROBE = """
import sys
if sys.argv[1] == "configure":
    from common.host_allocator import configure_host_allocator
    configure_host_allocator()
elif sys.argv[1] == "pretrain.main":
    import pretrain.main
import torch
print(torch.empty(4 << 20, dtype=torch.uint8).data_ptr() % 4096)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch's THP allocation is Linux-only")


def _page_offset(setup: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", PROBE, setup], cwd=ROOT, env={**clean, **env},
                            capture_output=True, text=True, timeout=300, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_configured_process_allocates_large_buffers_page_aligned():
    assert _page_offset("configure") == 0
    assert _page_offset("none") != 0  # torch's default 64-byte alignment: the probe tells the two apart


def test_a_value_the_user_exported_wins():
    assert _page_offset("configure", THP_MEM_ALLOC_ENABLE="0") != 0


def test_pretrain_main_configures_before_torch_allocates():
    assert _page_offset("pretrain.main") == 0
