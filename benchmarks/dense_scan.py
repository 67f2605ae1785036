"""The indexed dupmae search's dense candidates without a faiss index: `RowStore.dense_top` (a chunked scan of
bfloat16 dense halves with a running top m) against faiss's IndexFlatIP, which gave them before, in one run.

    python benchmarks/dense_scan.py [--docs 1000000] [--queries 300] [--candidates 300 800 1000] [--smoke]

Data: --docs unit-norm random vectors of --dim dimensions, stored as the RowStore stores them (float16), and
--queries random unit queries; faiss gets the same float16 values as float32. Both search all queries at once
(the scan in batches of evaluation.search.QUERY_BATCH, as the indexed search calls it), after one untimed warm-up
each; each time is the median of --repeats. Figures, per m in --candidates: sec_per_query (ours: the scan, baseline:
IndexFlatIP) and overlap_of_exact, the share of faiss's exact top m the scan returns (bfloat16 rounding may swap
near-ties at the m-th place; the indexed search rescores its candidates from the float16 rows). The speed of the
scan's matmul depends on the CPU's bfloat16 instructions (AMX, avx512_bf16): the lines carry the CPU's flags.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import smoke  # noqa: E402
from common.precision import cpu_flags  # noqa: E402
from evaluation.encode import Encoded  # noqa: E402
from evaluation.search import QUERY_BATCH, RowStore  # noqa: E402

BENCH = "dense_scan"
FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def unit_rows(g: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = g.normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def median_seconds(run, repeats: int) -> tuple[float, object]:
    result = run()  # warm-up: the first call of each
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--candidates", type=int, nargs="+", default=[300, 800, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = smoke.parse_args(parser, argv, docs=3000, queries=20, dim=32, candidates=[10, 100], repeats=1)
    g = np.random.default_rng(args.seed)
    dense = unit_rows(g, args.docs, args.dim).astype(np.float16)
    queries = unit_rows(g, args.queries, args.dim)
    corpus = Encoded([str(i) for i in range(args.docs)], dense, np.zeros((args.docs, 1), np.int32),
                     np.zeros((args.docs, 1), np.float16))
    store = RowStore(corpus, 1, scan=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(dense.astype(np.float32))
    flags = sorted(set(FLAGS) & cpu_flags())
    for m in args.candidates:
        ours, scan_rows = median_seconds(lambda: np.concatenate(
            [store.dense_top(queries[s:s + QUERY_BATCH], m) for s in range(0, len(queries), QUERY_BATCH)]),
            args.repeats)
        baseline, (_, flat_rows) = median_seconds(lambda: flat.search(queries, m), args.repeats)
        overlap = float(np.mean([len(set(a) & set(b)) / m for a, b in zip(scan_rows, flat_rows)]))
        common = {"docs": args.docs, "queries": args.queries, "dim": args.dim, "candidates": m,
                  "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)), "cpu_flags": flags,
                  "smoke": args.smoke}
        for metric, unit, value, base, better in (
                ("sec_per_query", "s", ours / args.queries, baseline / args.queries, "lower"),
                ("overlap_of_exact", "fraction", overlap, 1.0, "higher")):
            print(json.dumps({"bench": BENCH, "metric": metric, "unit": unit, "ours": round(value, 7),
                              "baseline": round(base, 7), "ratio": round(value / base, 4), "better": better,
                              **common}), flush=True)


if __name__ == "__main__":
    main()
