"""Does DupMAE pre-training make a better retriever? Continued pre-training of an existing encoder on a target
corpus, against the same budget without it, zero-shot and after the same fine-tuning (issue 12).

    python benchmarks/adaptation.py --output_dir runs/adaptation                  # ../shared SciFact + docstrings
    python benchmarks/adaptation.py --datasets BEIR_DIR... [--corpus DIR_OR_JSONL...] --output_dir OUT \
        [--seeds 2] [--variants none,dupmae]
    python benchmarks/adaptation.py --output_dir /tmp/adapt --smoke   # every stage on a tiny model and data, ~1 min

Variants, stages and the recipe: `experiments/adaptation.py`. Reference rows: BM25 (bm25s), and the base model
fused with BM25 by reciprocal rank (k = 60; `evaluation.fusion`), which needs no training. Without --corpus each
dataset's own corpus is its adaptation corpus (the paper's "DupMAE†").

Output in OUTPUT_DIR: one JSON line per (variant, dataset, stage, representation, metric) on stdout and in
results.jsonl, {"bench": "adaptation", ..., "ours", "baseline" (`none`, same stage, dataset and metric, its best
representation), "ratio", "per_seed", "spread"}; results.md (the table); a folder per dataset and seed with every
stage's output and log. A finished stage is reused when the script runs again with the same options.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import smoke  # noqa: E402
from experiments.adaptation import VARIANTS, AdaptationConfig, Experiment, prepare  # noqa: E402
from experiments.scoring import bm25_scores, fused_scores  # noqa: E402
from experiments.tables import markdown_tables  # noqa: E402

logger = logging.getLogger("adaptation")

SHARED_SCIFACT = REPO.parent / "shared" / "data" / "scifact"
METRICS = ("nDCG@10", "Recall@100")
STAGES = ("zero-shot", "fine-tuned")
#: --smoke: every stage on a tiny random-init model (when --model_name_or_path is not given) and a tiny BEIR folder.
SMOKE = {"variants": "none,dupmae", "max_steps": 2, "freeze_encoder_steps": 1, "per_device_train_batch_size": 4,
         "max_seq_length": 64, "finetune_steps": 2, "finetune_batch_size": 4, "max_length": 64}


def report(cfg: AdaptationConfig, results: dict, references: dict[str, dict[str, dict[str, float]]]) -> list[dict]:
    """The JSON lines: every (variant, dataset, stage, representation, metric), averaged over seeds, after the
    reference rows ({dataset: {(variant, representation): metrics}}: BM25, the base model fused with BM25)."""
    lines = []
    for dataset, per_seed in results.items():
        for (variant, representation), scores in references[dataset].items():
            for metric in METRICS:
                lines.append({"bench": "adaptation", "variant": variant, "dataset": dataset, "stage": "zero-shot",
                              "representation": representation, "metric": metric, "ours": round(scores[metric], 4),
                              "baseline": None, "ratio": None, "better": "higher"})
        for stage in STAGES:
            for metric in METRICS:
                baselines = [max(v[metric] for v in seed["none"][stage].values())
                             for seed in per_seed if stage in seed["none"]]
                if not baselines:
                    continue
                baseline = statistics.fmean(baselines)
                for variant in cfg.variants:
                    for representation in per_seed[0][variant].get(stage, {}):
                        values = [seed[variant][stage][representation][metric] for seed in per_seed]
                        ours = statistics.fmean(values)
                        lines.append({"bench": "adaptation", "variant": variant, "dataset": dataset, "stage": stage,
                                      "representation": representation, "metric": metric, "ours": round(ours, 4),
                                      "baseline": round(baseline, 4), "ratio": round(ours / baseline, 4),
                                      "better": "higher", "seeds": len(values),
                                      "per_seed": [round(v, 4) for v in values],
                                      "spread": round(max(values) - min(values), 4)})
    return lines


def markdown(lines: list[dict]) -> str:
    """One table per dataset: rows (variant, stage, representation), columns the metrics (mean ± spread/2)."""
    return markdown_tables(lines, METRICS, show_difference=lambda line: line["ratio"] is not None,
                           footnote="Cells: mean over seeds (± half the spread) and, in brackets, the difference to "
                                    "`none` at the same stage with its best representation.")


def parse_args(argv: list[str] | None) -> tuple[AdaptationConfig, bool]:
    """(the config, whether --smoke was given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = AdaptationConfig(output_dir="")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--datasets", nargs="*", default=[], help="BEIR folders (default: SciFact + docstrings)")
    parser.add_argument("--corpus", nargs="*", default=[], help="adaptation corpus for every dataset")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    for name, value in asdict(defaults).items():
        if name not in ("output_dir", "datasets", "corpus", "variants"):
            parser.add_argument(f"--{name}", type=type(value), default=value)
    args = vars(smoke.parse_args(parser, argv, **SMOKE))
    smoke_mode = args.pop("smoke")
    args["variants"] = tuple(v.strip() for v in args["variants"].split(",") if v.strip())
    return AdaptationConfig(**args), smoke_mode


def default_datasets(out: Path) -> list[Path]:
    """../shared SciFact when present, and the offline docstring set (built into OUTPUT_DIR/data)."""
    from demo.docstring_corpus import build

    docstrings = out / "data" / "docstrings"
    if not (docstrings / "corpus.jsonl").is_file():
        build(docstrings)
    return ([SHARED_SCIFACT] if (SHARED_SCIFACT / "corpus.jsonl").is_file() else []) + [docstrings]


def main(argv: list[str] | None = None) -> None:
    from common.logging_setup import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg, smoke_mode = parse_args(argv)
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    if smoke_mode and cfg.model_name_or_path == "default":
        cfg.model_name_or_path = str(smoke.tiny_bert(out / "data" / "tiny-model"))
    datasets = [Path(d).resolve() for d in cfg.datasets] or (
        [smoke.tiny_beir(out / "data" / "tiny")] if smoke_mode else default_datasets(out))
    os.chdir(REPO)  # stages run the repository's entry points by relative path
    start = time.perf_counter()
    results, references, seconds = {}, {}, {}
    with contextlib.redirect_stdout(sys.stderr):  # the stages' streamed output; stdout carries the JSON lines only
        for dataset in datasets:
            shards, negatives, prep_seconds = prepare(cfg, dataset, out / "logs")
            seconds.update(prep_seconds)
            references[dataset.name] = {
                ("bm25", "bm25"): bm25_scores(dataset, cfg.max_eval_docs),
                ("none+bm25", "rrf"): fused_scores(cfg.model_name_or_path, dataset, cfg.max_length, cfg.max_eval_docs)}
            results[dataset.name] = []
            for seed in range(cfg.seeds):
                experiment = Experiment(cfg, dataset, 42 + seed, shards, negatives)
                results[dataset.name].append({variant: experiment.run(variant) for variant in cfg.variants})
                seconds.update(experiment.seconds)
    minutes = (time.perf_counter() - start) / 60
    lines = report(cfg, results, references)
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "results.md").write_text(markdown(lines) + f"\n\nThis run: {minutes:.1f} min on {os.cpu_count()} cores "
                                    "(finished stages reused from earlier runs take no time).\n")
    (out / "stage_seconds.json").write_text(json.dumps({**seconds, "total": minutes * 60}, indent=2) + "\n")
    for line in lines:
        print(json.dumps(line))
    logger.info("done in %.1f min; %s/results.md", minutes, out)


if __name__ == "__main__":
    main()
