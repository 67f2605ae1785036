"""How a CPU training process allocates host memory: torch's large buffers page-aligned, on huge pages.

Why: a CPU training step allocates and frees the same large activation buffers every step. Under glibc's
default malloc, buffers below its dynamic mmap threshold (which rises to 32 MiB after the first large free)
come from the heap, where freed ones sit between live ones and stay resident. At the
`benchmarks/pretrain_step.py` setting (MiniLM, seq 256, batch 8, AdamW, gradient checkpointing) the peak RSS
was 1,303-1,458 MiB over 6 runs for about 920 MiB live (measured with every allocation mmapped). torch's
`THP_MEM_ALLOC_ENABLE=1` allocates every CPU buffer of 2 MiB or more page-aligned and advises it for
transparent huge pages; the same step then peaked at 1,105-1,149 MiB (3 runs and 2 benchmark minima; 1,177
with huge pages disabled for the process, i.e. from the page alignment's effect on glibc's placement alone),
with a fifth of the page faults and the same CPU time per step within noise (system time about +0.1 s per
step). At batch 16 (one step) 1,631 -> 1,255 MiB. It is an empirical setting, not a guarantee: without
checkpointing it gave 1,931 -> 1,671 MiB at batch 16 (one step) but 1,542-1,661 -> 1,726-1,764 MiB at batch
8 (3 runs; 3 runs and 2 benchmark minima). Mmapping every large buffer instead (glibc's M_MMAP_THRESHOLD at
128 KiB to 4 MiB) reached 920-1,210 MiB but re-faults and zeroes those buffers every step: 2-4x the system
time, about 10 % more CPU time per step.

torch reads the variable once, at its first CPU allocation, so this runs before `import torch`
(`pretrain/main.py`); a value already in the environment wins (`THP_MEM_ALLOC_ENABLE=0` turns it off).
Linux only (elsewhere torch ignores it).
"""
from __future__ import annotations

import os

#: Environment variables a training process sets for torch's CPU allocator, unless the user already did.
ALLOCATOR_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def configure_host_allocator() -> None:
    """Set ALLOCATOR_ENV, keeping values the user exported; no effect once torch has allocated."""
    for name, value in ALLOCATOR_ENV.items():
        os.environ.setdefault(name, value)
