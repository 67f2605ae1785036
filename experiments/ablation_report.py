"""The ablation's JSON lines, table and verdict: every cell averaged over seeds with its spread, each against the
`mlm` cell of the same row, plus an `average` over the test sets (per seed, then over seeds), which the verdict
reads."""
from __future__ import annotations

import statistics

from experiments.tables import markdown_tables

METRICS = ("nDCG@10", "Recall@100")
STAGES = ("zero-shot", "fine-tuned")
AVERAGE = "average"
#: The paper's order after fine-tuning, each variant with its representation (nDCG@10 averaged over the test sets).
CLAIMED_ORDER = (("dupmae", "dupmae"), ("retromae", "cls"), ("mlm", "cls"), ("none", "cls"))


def with_average(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """results plus an `average` dataset: per seed, each cell's metrics averaged over the test sets."""
    names = list(results)
    if len(names) < 2:
        return results
    seeds = len(results[names[0]])
    average = []
    for seed in range(seeds):
        first = results[names[0]][seed]
        average.append({variant: {stage: {rep: {metric: statistics.fmean(results[name][seed][variant][stage][rep][metric]
                                                                         for name in names)
                                                for metric in METRICS}
                                          for rep in reps}
                                  for stage, reps in stages.items()}
                        for variant, stages in first.items()})
    return {**results, AVERAGE: average}


def _cell(per_seed: list[dict], variant: str, stage: str, representation: str, metric: str) -> list[float] | None:
    try:
        return [seed[variant][stage][representation][metric] for seed in per_seed]
    except KeyError:
        return None


def report_lines(results: dict[str, list[dict]], references: dict[str, dict[tuple[str, str], dict]]) -> list[dict]:
    """One JSON line per (variant, dataset, stage, representation, metric); reference rows first (no baseline)."""
    lines = []
    for dataset, per_seed in with_average(results).items():
        for (row, representation), scores in references.get(dataset, {}).items():
            for metric in METRICS:
                lines.append({"bench": "ablation", "variant": row, "dataset": dataset, "stage": "zero-shot",
                              "representation": representation, "metric": metric, "ours": round(scores[metric], 4),
                              "baseline": None, "ratio": None, "better": "higher", "seeds": 1, "spread": 0.0})
        for stage in STAGES:
            for variant in per_seed[0]:
                for representation in per_seed[0][variant].get(stage, {}):
                    for metric in METRICS:
                        values = _cell(per_seed, variant, stage, representation, metric)
                        base_rep = representation if _cell(per_seed, "mlm", stage, representation, metric) else "cls"
                        base = _cell(per_seed, "mlm", stage, base_rep, metric)
                        ours = statistics.fmean(values)
                        baseline = statistics.fmean(base) if base else None
                        lines.append({
                            "bench": "ablation", "variant": variant, "dataset": dataset, "stage": stage,
                            "representation": representation, "metric": metric, "ours": round(ours, 4),
                            "baseline": round(baseline, 4) if baseline is not None else None,
                            "baseline_cell": f"mlm/{base_rep}" if base else None,
                            "ratio": round(ours / baseline, 4) if baseline else None, "better": "higher",
                            "seeds": len(values), "per_seed": [round(v, 4) for v in values],
                            "spread": round(max(values) - min(values), 4)})
    return lines


def _find(lines: list[dict], dataset: str, variant: str, stage: str, representation: str,
          metric: str = "nDCG@10") -> dict | None:
    return next((x for x in lines if (x["dataset"], x["variant"], x["stage"], x["representation"], x["metric"])
                 == (dataset, variant, stage, representation, metric)), None)


def verdict(lines: list[dict]) -> str:
    """The paper's claims checked against the numbers: a gap counts only when larger than both cells' seed spread,
    and one seed decides nothing (a spread of 0 is no measure of noise)."""
    datasets = {x["dataset"] for x in lines}
    dataset = AVERAGE if AVERAGE in datasets else next(iter(sorted(datasets)), None)
    said = []

    def compare(upper: tuple[str, str], lower: tuple[str, str], stage: str) -> str | None:
        a, b = _find(lines, dataset, upper[0], stage, upper[1]), _find(lines, dataset, lower[0], stage, lower[1])
        if a is None or b is None:
            return None
        gap, noise = a["ours"] - b["ours"], max(a["spread"], b["spread"])
        word = "above" if gap > noise else "below" if gap < -noise else "within the seed spread of"
        return (f"{upper[0]} ({upper[1]}) is {word} {lower[0]} ({lower[1]}): {a['ours']:.4f} vs {b['ours']:.4f}, "
                f"gap {gap:+.4f}, spread {noise:.4f}")

    checks = [compare(CLAIMED_ORDER[i], CLAIMED_ORDER[i + 1], "fine-tuned") for i in range(len(CLAIMED_ORDER) - 1)]
    checks = [c for c in checks if c]
    if checks:
        seeds = min(x["seeds"] for x in lines if x["dataset"] == dataset and x["baseline"] is not None)
        if seeds < 2:
            outcome = "is UNDECIDED (one seed: no seed spread to weigh the gaps against; the order seen"
            outcome += " matches)" if all(" is above " in c for c in checks) else " does not match)"
        else:
            outcome = "HOLDS" if all(" is above " in c for c in checks) else "does NOT hold"
        said.append(f"Fine-tuned, nDCG@10 on {dataset}: the paper's order dupmae > retromae > mlm > none "
                    f"{outcome}: " + "; ".join(checks) + ".")
    zero_shot = [compare((v, "cls"), ("mlm", "cls"), "zero-shot") for v in ("retromae", "dupmae")]
    zero_shot = [c for c in zero_shot if c]
    if zero_shot:
        said.append(f"Zero-shot [CLS], nDCG@10 on {dataset}: " + "; ".join(zero_shot) + ".")
    return "\n\n".join(said) or "Not enough variants for a verdict (needs mlm and at least one of retromae, dupmae)."


def markdown(lines: list[dict]) -> str:
    """One table per dataset (the average first): mean ± half the seed spread, and the difference to the mlm cell
    of the same row."""
    return markdown_tables(
        lines, METRICS, show_difference=lambda line: line["variant"] != "mlm", first=AVERAGE,
        title=lambda name: "average over the test sets" if name == AVERAGE else name,
        footnote="Cells: mean over seeds ± half the spread (max − min) and, in brackets, the difference to the "
                 "`mlm` cell of the same stage and representation (its `cls` for `dupmae`). Reference rows (BM25, the "
                 "packaged all-MiniLM-L6-v2, and it fused with BM25) are trained models or none, not the same budget.")
