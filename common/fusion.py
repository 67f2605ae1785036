"""Reciprocal rank fusion and trec_eval's ranking order, shared by evaluation (`--fuse bm25`) and fine-tuning
(`finetune.teacher_scores --scorer fusion`), so a fusion teacher ranks exactly as the evaluated fusion does.

RRF (Cormack, Clarke & Büttcher, SIGIR 2009) scores a document by Σ_runs 1 / (k + rank), rank counted from 1 in
each run; a document missing from a run adds nothing.
"""
from __future__ import annotations


def ranked(run: dict[str, float]) -> list[tuple[str, float]]:
    """trec_eval's order: score descending, ties by document id descending."""
    return sorted(run.items(), key=lambda item: (item[1], item[0]), reverse=True)


def reciprocal_rank_fusion(runs: list[dict[str, dict[str, float]]], k: int = 60,
                           depth: int | None = None) -> dict[str, dict[str, float]]:
    """{query id: {doc id: Σ 1/(k + rank)}} over the runs (ties within a run broken by `ranked`'s order), cut to
    the best `depth` per query when given."""
    if k < 0:
        raise ValueError(f"reciprocal_rank_fusion: k must be >= 0, got {k}")
    fused: dict[str, dict[str, float]] = {}
    for run in runs:
        for qid, scores in run.items():
            row = fused.setdefault(qid, {})
            for rank, (doc, _) in enumerate(ranked(scores), start=1):
                row[doc] = row.get(doc, 0.0) + 1.0 / (k + rank)
    if depth is not None:
        fused = {qid: dict(ranked(row)[:depth]) for qid, row in fused.items()}
    return fused
