"""The markdown tables of an experiment's JSON lines: one table per dataset, rows (variant, stage, representation),
one column per metric. Shared by the adaptation experiment and the ablation so their tables read alike."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def markdown_tables(lines: list[dict], metrics: Sequence[str], footnote: str,
                    show_difference: Callable[[dict], bool], title: Callable[[str], str] = str,
                    first: str | None = None) -> str:
    """Cells: the mean, ± half the seed spread when there are several seeds, and (where `show_difference` says)
    the difference to the line's baseline in brackets. `first` names a dataset whose table comes first."""
    out = []
    datasets = list(dict.fromkeys(x["dataset"] for x in lines))
    for dataset in sorted(datasets, key=lambda name: name != first):
        rows: dict[tuple, dict] = {}
        for line in (x for x in lines if x["dataset"] == dataset):
            cell = f"{line['ours']:.4f}"
            if line.get("seeds", 1) > 1:
                cell += f" ± {line['spread'] / 2:.4f}"
            if line["baseline"] is not None and show_difference(line):
                cell += f" ({line['ours'] - line['baseline']:+.4f})"
            rows.setdefault((line["variant"], line["stage"], line["representation"]), {})[line["metric"]] = cell
        out += [f"### {title(dataset)}", "", "| variant | stage | representation | " + " | ".join(metrics) + " |",
                "|---|---|---|" + "---|" * len(metrics)]
        out += [f"| {v} | {s} | {r} | " + " | ".join(cells.get(m, "") for m in metrics) + " |"
                for (v, s, r), cells in rows.items()]
        out.append("")
    out.append(footnote)
    return "\n".join(out)
