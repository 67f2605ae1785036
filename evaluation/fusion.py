"""Dense ⊕ BM25 by reciprocal rank fusion: the strongest training-free baseline a retrieval model must beat.

    python -m evaluation.beir --model M --datasets D --output_dir OUT --fuse bm25 --rrf_k 60

RRF (Cormack, Clarke & Büttcher, SIGIR 2009; `common.fusion`, shared with fine-tuning's fusion teacher) scores a
document by Σ_runs 1 / (k + rank), rank counted from 1 in each run; a document missing from a run adds nothing.
It needs no score calibration and has one constant, k = 60 in the paper and here by default. BM25 is `common.bm25` (Anserini's BEIR baseline by default; `--bm25`).
"""
from __future__ import annotations

from common.fusion import reciprocal_rank_fusion  # noqa: F401  (shared with fine-tuning's fusion teacher)
from evaluation.data import BeirData

FUSIONS = ("none", "bm25")


def bm25_run(data: BeirData, depth: int, bm25: str = "standard") -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} of BM25, the top `depth` per query, without a document that has the query's id
    (BEIR's convention, as in `evaluation.search`); scores are depth - rank, so only the order is meaningful.
    bm25: a `common.bm25.PRESETS` name."""
    from common.bm25 import bm25_search, preset

    rows = bm25_search(data.query_texts, data.doc_texts, depth + 1, preset(bm25))
    run = {}
    for qid, hits in zip(data.query_ids, rows):
        kept = [data.doc_ids[i] for i in hits if data.doc_ids[i] != qid][:depth]
        run[qid] = {doc: float(depth - rank) for rank, doc in enumerate(kept)}
    return run
