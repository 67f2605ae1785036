"""The demo's summary: a results table (the packaged model and the DupMAE-adapted one, zero-shot and fine-tuned),
stage times, and a plot of pre-training: the loss terms and the retrieval probe's scores over the steps."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = ("nDCG@10", "MRR@10", "Recall@100")
LOSS_TERMS = (("mlm_loss", "encoder MLM"), ("decoder_loss", "[CLS] decoder"), ("bow_loss", "bag of words (OT)"))
PROBES = (("eval/mean/nDCG@10", "mean pooling"), ("eval/cls/nDCG@10", "[CLS]"),
          ("eval/dupmae/nDCG@10", "dupmae (dense + sparse)"))


def results_table(rows: dict[str, dict[str, float]], stage_seconds: dict[str, float]) -> str:
    """Markdown: one row per model, one column per metric; then the time of each stage."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stage_seconds.items()]
    return "\n".join(lines)


def plot_pretrain_curves(metrics_jsonl: Path, png: Path) -> None:
    """Left: each pre-training loss term against the step. Right: the retrieval probe's nDCG@10 per representation
    (step 0 is the model before any step), so when retrieval stops improving shows beside the losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    figure, (losses, probes) = plt.subplots(1, 2, figsize=(12, 4))
    for axis, series, title, ylabel in ((losses, LOSS_TERMS, "loss terms", "loss"),
                                        (probes, PROBES, "zero-shot retrieval (probe sample)", "nDCG@10")):
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), marker="o" if axis is probes else None, label=label)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.set_title(f"DupMAE pre-training: {title}")
        if axis.get_lines():
            axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
