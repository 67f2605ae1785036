"""The demo's summary: a results table (the packaged model and the DupMAE-adapted one, zero-shot and fine-tuned,
beside the packaged model fused with BM25) and the time of each stage. The pre-training plot is
`experiments.curves`'."""
from __future__ import annotations

METRICS = ("nDCG@10", "MRR@10", "Recall@100")


def results_table(rows: dict[str, dict[str, float]], stage_seconds: dict[str, float]) -> str:
    """Markdown: one row per model, one column per metric; then the time of each stage."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stage_seconds.items()]
    return "\n".join(lines)
