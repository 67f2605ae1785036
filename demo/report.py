"""The demo's summary: a results table (the packaged model, with and without the DupMAE BoW head, zero-shot beside
the packaged model fused with BM25, then fine-tuned), the model folder each row scores, and the time of each stage.
The pre-training plot is `experiments.curves`'."""
from __future__ import annotations

METRICS = ("nDCG@10", "MRR@10", "Recall@100")


def results_table(rows: dict[str, dict[str, float]], stage_seconds: dict[str, float],
                  artifacts: dict[str, str] | None = None) -> str:
    """Markdown: one row per model, one column per metric (and the model folder that reproduces the row, when
    given); then the time of each stage."""
    extra = " model folder |" if artifacts else ""
    lines = ["| model | " + " | ".join(METRICS) + " |" + extra, "|---|" + "---|" * (len(METRICS) + bool(artifacts))]
    for name, scores in rows.items():
        folder = f" {artifacts.get(name, '')} |" if artifacts else ""
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |" + folder)
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stage_seconds.items()]
    return "\n".join(lines)
