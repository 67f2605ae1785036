"""The demo's summary: a results table (zero-shot vs DupMAE pre-trained + fine-tuned), stage times, and a
plot of the pre-training loss terms over steps."""
from __future__ import annotations

import json
from pathlib import Path

METRICS = ("nDCG@10", "MRR@10", "Recall@100")
LOSS_TERMS = (("mlm_loss", "encoder MLM"), ("decoder_loss", "[CLS] decoder"), ("bow_loss", "bag of words (OT)"))


def dataset_scores(results_file: Path) -> dict[str, float]:
    """The one dataset's metrics from an `evaluation.beir` results.json (its "average" when there are several)."""
    results = json.loads(Path(results_file).read_text())
    return results["average"] if "average" in results else next(iter(results.values()))


def results_table(rows: dict[str, dict[str, float]], stage_seconds: dict[str, float]) -> str:
    """Markdown: one row per model, one column per metric; then the time of each stage."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in stage_seconds.items()]
    return "\n".join(lines)


def plot_pretrain_losses(metrics_jsonl: Path, png: Path) -> None:
    """One line per loss term of pre-training against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and "loss" in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, label in LOSS_TERMS:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("DupMAE pre-training loss terms")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
