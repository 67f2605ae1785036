"""BEIR evaluation of any encoder this project makes, and of the baselines, the way the field reports it.

    python -m evaluation.beir --model OUT/export --datasets ../shared/data/scifact nfcorpus \
        --output_dir eval_out [--representation cls|mean|dupmae] [--normalize true] [--split test] \
        [--fuse bm25 --rrf_k 60]   # the model's ranking fused with BM25's by reciprocal rank (evaluation.fusion)

Sharded corpus encoding (one process per GPU or node), then one merging run that searches and scores:

    for i in 0 1 2 3; do python -m evaluation.beir ... --num_shards 4 --shard_index $i & done; wait
    python -m evaluation.beir ... --num_shards 4

Writes OUTPUT_DIR/results.json, results.md and DATASET.run (TREC format); embeddings are cached in
OUTPUT_DIR/cache (--cache_dir) keyed by model, data, split, representation and max length.
"""
from __future__ import annotations

import json
import sys

from transformers import HfArgumentParser

from common.logging_setup import setup_logging
from evaluation.config import EvalConfig
from evaluation.data import DatasetError
from evaluation.pipeline import run


def main(argv: list[str] | None = None) -> dict | None:
    setup_logging()
    (cfg,) = HfArgumentParser(EvalConfig).parse_args_into_dataclasses(args=argv)
    try:
        results = run(cfg)
    except DatasetError as exc:
        sys.exit(f"error: {exc}")
    if results is not None:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
