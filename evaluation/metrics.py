"""Retrieval metrics with pytrec_eval (the trec_eval implementation BEIR and MTEB report), and the result files.

Means are over every query of the split's qrels: a query without results counts 0 (BEIR divides by the queries
pytrec_eval returned, which is the same number whenever every query gets a ranking, as here).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytrec_eval

from common.fusion import ranked  # noqa: F401  trec_eval's order (shared with fine-tuning's fusion teacher)

#: Reported names -> pytrec_eval measures. MRR@10 is recip_rank on the run cut at 10.
MEASURES = {
    "nDCG@1": "ndcg_cut_1", "nDCG@3": "ndcg_cut_3", "nDCG@5": "ndcg_cut_5", "nDCG@10": "ndcg_cut_10",
    "nDCG@100": "ndcg_cut_100", "MRR@10": "recip_rank", "Recall@10": "recall_10", "Recall@100": "recall_100",
    "Recall@1000": "recall_1000", "MAP@1000": "map_cut_1000",
}
MRR_CUTOFF = 10


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of every metric in MEASURES over the qrels' queries."""
    full = pytrec_eval.RelevanceEvaluator(qrels, {m for name, m in MEASURES.items() if name != "MRR@10"})
    per_query = full.evaluate(run)
    cut_run = {qid: dict(ranked(docs)[:MRR_CUTOFF]) for qid, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut_run)
    results = {}
    for name, measure in MEASURES.items():
        source = mrr if name == "MRR@10" else per_query
        results[name] = sum(source[q][measure] for q in qrels if q in source) / max(len(qrels), 1)
    return results


def average(per_dataset: dict[str, dict[str, float]]) -> dict[str, float]:
    names = list(MEASURES)
    return {n: sum(r[n] for r in per_dataset.values()) / len(per_dataset) for n in names}


def write_run(path: str | Path, run: dict[str, dict[str, float]], tag: str) -> None:
    """TREC run format: qid Q0 docid rank score tag, best first."""
    with Path(path).open("w", encoding="utf-8") as f:
        for qid, docs in run.items():
            for rank, (doc_id, s) in enumerate(ranked(docs), 1):
                f.write(f"{qid} Q0 {doc_id} {rank} {s:.6f} {tag}\n")


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    names = list(MEASURES)
    lines = ["| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for dataset, metrics in results.items():
        lines.append(f"| {dataset} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_results(output_dir: str | Path, per_dataset: dict[str, dict[str, float]]) -> dict:
    """results.json ({dataset: metrics, "average": metrics}) and results.md; returns what was written."""
    out = Path(output_dir)
    results = dict(per_dataset)
    if len(per_dataset) > 1:
        results["average"] = average(per_dataset)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(results))
    return results
