"""Training attention on CPU with dropout: `pretrain.cpu_attention.attention` vs PyTorch SDPA (math path).

    python benchmarks/cpu_attention.py [--batch_size 8] [--heads 12] [--seq_len 256] [--head_dim 32] [--repeats 5]
        [--smoke]

One forward + backward of attention with dropout 0.1 and a padding mask, 1 thread, best of --repeats, both in
the same run. Prints one JSON line per figure: seconds per forward + backward, seconds to draw the dropout
mask alone (ours: `drop_mask`; PyTorch: the `bernoulli_` SDPA's math path runs), and the bytes autograd
keeps for backward (storages saved by the graph).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import smoke  # noqa: E402
from pretrain.cpu_attention import attention, drop_mask  # noqa: E402

BENCH = "cpu_attention"
DROPOUT = 0.1


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while fn builds its graph."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--head_dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = smoke.parse_args(parser, batch_size=1, heads=2, seq_len=32, head_dim=8, repeats=1)
    torch.set_num_threads(1)
    shape = (args.batch_size, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    mask = torch.ones(args.batch_size, 1, args.seq_len, args.seq_len, dtype=torch.bool)
    mask[::2, ..., args.seq_len * 3 // 4:] = False  # half the rows padded
    ours = lambda: attention(q, k, v, mask, DROPOUT)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=DROPOUT)  # noqa: E731
    scores = (args.batch_size, args.heads, args.seq_len, args.seq_len)
    noise = torch.empty(scores)
    figures = {
        "fwd_bwd_seconds": (best_seconds(lambda: ours().sum().backward(), args.repeats),
                            best_seconds(lambda: sdpa().sum().backward(), args.repeats), "s", "lower"),
        "dropout_mask_seconds": (best_seconds(lambda: drop_mask(scores, DROPOUT, q.device), args.repeats),
                                 best_seconds(lambda: noise.bernoulli_(1 - DROPOUT), args.repeats), "s", "lower"),
        "saved_for_backward_MiB": (saved_bytes(ours) / 2**20, saved_bytes(sdpa) / 2**20, "MiB", "lower"),
    }
    common = {"shape": list(shape), "dropout": DROPOUT, "threads": 1, "smoke": args.smoke}
    for metric, (mine, base, unit, better) in figures.items():
        print(json.dumps({"bench": BENCH, "metric": metric, "unit": unit, "ours": round(mine, 4),
                          "baseline": round(base, 4), "ratio": round(mine / base, 3), "better": better, **common}))


if __name__ == "__main__":
    main()
