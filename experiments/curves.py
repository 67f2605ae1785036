"""Pre-training curves of one or several runs in one PNG: each loss term, and the retrieval probe's zero-shot
nDCG@10 per representation, against the optimizer step (step 0 of the probe is the model before any step), so
whether retrieval improves while the losses fall shows beside them."""
from __future__ import annotations

import json
from pathlib import Path

LOSS_TERMS = (("mlm_loss", "encoder MLM"), ("decoder_loss", "[CLS] decoder"), ("bow_loss", "bag of words (OT)"))
PROBES = (("eval/cls/nDCG@10", "[CLS]"), ("eval/mean/nDCG@10", "mean pooling"),
          ("eval/dupmae/nDCG@10", "dupmae (dense + sparse)"))
_STYLES = ("-", "--", ":")


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a line cut short by a crash is skipped)."""
    records = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(runs: dict[str, Path], png: Path, title: str = "pre-training") -> None:
    """runs: {label: metrics.jsonl}. One colour per run, one line style per loss term or representation; a term a
    run does not train (logged as 0, e.g. bow_loss of RetroMAE) is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, probes) = plt.subplots(1, 2, figsize=(14, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, path) in enumerate(runs.items()):
        records = read_metrics(path)
        colour = colours[index % len(colours)]
        for axis, series in ((losses, LOSS_TERMS), (probes, PROBES)):
            for style, (key, name) in zip(_STYLES, series):
                points = [(r["step"], r[key]) for r in records if key in r]
                if points and any(value for _, value in points):
                    axis.plot(*zip(*points), style, color=colour, marker="o" if axis is probes else None,
                              markersize=3, label=f"{label}: {name}" if len(runs) > 1 else name)
    for axis, what, ylabel in ((losses, "loss terms", "loss"), (probes, "zero-shot retrieval (probe sample)",
                                                                "nDCG@10")):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{title}: {what}")
        if axis.get_lines():
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(png, dpi=120)
    plt.close(figure)
