"""`make demo`: does DupMAE pre-training give a better retriever? The whole pipeline on offline defaults, in about
15 minutes on 2 CPU cores.

    python -m demo                      # the offline docstring retrieval set (demo/docstring_corpus.py)
    python -m demo --dataset scifact    # a BEIR folder, or a BEIR name when the network allows

The story is the adaptation experiment of `benchmarks/adaptation.py` on one dataset with two variants
(`experiments.adaptation`): the packaged all-MiniLM-L6-v2 as it is (`none`) and DupMAE continued pre-training on the
dataset's corpus (`dupmae`), each scored zero-shot and after the same fine-tuning. Stages (each a subprocess with
its own log in OUT/logs; a finished stage is reused on the next run): retrieval set -> Beam preprocessing of its
corpus -> BM25 hard negatives for the training queries -> zero-shot evaluation of the packaged model -> its
fine-tuning (the control) and evaluation -> DupMAE pre-training with DeepSpeed, with the retrieval probe ->
zero-shot evaluation of the export -> its fine-tuning and evaluation; the packaged model fused with BM25 by
reciprocal rank is the training-free reference row. Then a results table and
OUT/pretrain_curves.png (loss terms and probe scores over the pre-training steps).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.logging_setup import setup_logging
from demo.report import results_table
from experiments.adaptation import AdaptationConfig, Experiment, prepare
from experiments.curves import plot_curves
from experiments.scoring import fused_scores
from experiments.stages import Stage, StageFailed, run_stage
from evaluation.config import EvalConfig
from evaluation.data import DatasetError, resolve_dataset

logger = logging.getLogger("demo")

SEED = 42


@dataclass
class DemoConfig:
    dataset: str | None = None  # BEIR folder or name; None builds the offline docstring set
    output_dir: str = "demo_output"  # everything the demo writes
    pretrain_steps: int = 100  # DupMAE optimizer steps of 16 blocks of 128 tokens (about 2.5 s each on 2 cores)
    finetune_steps: int = 30  # fine-tuning steps of 16 queries (positive + one BM25 negative each)
    probe_steps: int = 50  # the retrieval probe's period during pre-training (and at step 0)

    def __post_init__(self) -> None:
        if min(self.pretrain_steps, self.finetune_steps, self.probe_steps) < 1:
            raise ValueError("--pretrain_steps, --finetune_steps and --probe_steps must be >= 1")


def _beir_folder(dataset: str) -> Path:
    """A BEIR folder as given, or a bare BEIR name fetched the way evaluation fetches it (network allowing)."""
    data_dir = next(f.default for f in fields(EvalConfig) if f.name == "data_dir")
    return resolve_dataset(dataset, data_dir, allow_download=True).resolve()


FUSED = "packaged all-MiniLM-L6-v2 + BM25 (reciprocal rank, k = 60), no training"


def rows(results: dict, fused: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """The demo table: the packaged model and the DupMAE-adapted one, zero-shot and after the same fine-tuning,
    and (when given) the packaged model fused with BM25."""
    names = {("none", "zero-shot", "mean"): "packaged all-MiniLM-L6-v2, zero-shot",
             ("none", "fine-tuned", "mean"): "same fine-tuning without pre-training (control)",
             ("dupmae", "zero-shot", "dupmae"): "DupMAE-adapted, zero-shot",
             ("dupmae", "fine-tuned", "dupmae"): "DupMAE-adapted + fine-tuned"}
    table = {name: results[variant][stage][representation] for (variant, stage, representation), name in names.items()
             if stage in results[variant]}
    return {**table, FUSED: fused} if fused is not None else table


def verdict(table_rows: dict[str, dict[str, float]]) -> str:
    """What the numbers say, in words: each DupMAE row against the row it must beat (nDCG@10)."""
    pairs = (("DupMAE-adapted, zero-shot", "packaged all-MiniLM-L6-v2, zero-shot", "zero-shot"),
             ("DupMAE-adapted + fine-tuned", "same fine-tuning without pre-training (control)", "after fine-tuning"))
    said = []
    for ours, theirs, when in pairs:
        if ours in table_rows and theirs in table_rows:
            delta = table_rows[ours]["nDCG@10"] - table_rows[theirs]["nDCG@10"]
            word = "better than" if delta > 0 else "worse than" if delta < 0 else "equal to"
            said.append(f"{when}, DupMAE pre-training is {word} its control by {delta:+.4f} nDCG@10")
    best = max((name for name in table_rows if name.startswith("DupMAE")), default=None,
               key=lambda name: table_rows[name]["nDCG@10"])
    if FUSED in table_rows and best is not None:
        delta = table_rows[best]["nDCG@10"] - table_rows[FUSED]["nDCG@10"]
        said.append(f"the best DupMAE row is {'above' if delta > 0 else 'below'} the packaged model fused with BM25 "
                    f"(no training) by {delta:+.4f} nDCG@10")
    return "; ".join(said) + "."


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="BEIR folder or name (default: offline docstring set)")
    for name in ("output_dir", "pretrain_steps", "finetune_steps", "probe_steps"):
        default = getattr(DemoConfig, name)
        parser.add_argument(f"--{name}", type=type(default), default=default)
    config = DemoConfig(**vars(parser.parse_args(argv)))
    out = Path(config.output_dir).resolve()
    try:
        if config.dataset is None:
            data = out / "data" / "docstrings"
            seconds = {"build-dataset": run_stage(Stage("build-dataset", ["python", "-m", "demo.docstring_corpus",
                                                                          str(data)], data), out / "logs")}
        else:
            data, seconds = _beir_folder(config.dataset), {}
        probe = ("--eval_dataset", str(data), "--eval_steps", str(config.probe_steps), "--eval_max_queries", "100",
                 "--eval_max_docs", "400")
        cfg = AdaptationConfig(output_dir=str(out), variants=("none", "dupmae"), max_steps=config.pretrain_steps,
                               freeze_encoder_steps=config.pretrain_steps, finetune_steps=config.finetune_steps,
                               pretrain_extra=probe)
        shards, negatives, prep_seconds = prepare(cfg, data, out / "logs")
        experiment = Experiment(cfg, data, SEED, shards, negatives)
        results = {variant: experiment.run(variant) for variant in cfg.variants}
        fused = fused_scores(cfg.model_name_or_path, data, cfg.max_length, cfg.max_eval_docs)
    except (StageFailed, DatasetError) as failure:
        logger.error("%s", failure)
        return 1
    seconds.update(prep_seconds)
    seconds.update(experiment.seconds)
    table = results_table(rows(results, fused), seconds) + "\n\n" + verdict(rows(results, fused))
    pretrain = experiment.out / "dupmae" / "pretrain"
    plot_curves({"dupmae": pretrain / "metrics.jsonl"}, out / "pretrain_curves.png", "DupMAE pre-training")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "results": results,
                                                  "stage_seconds": seconds}, indent=2) + "\n")
    print("\n" + table + f"\n\nWritten: {out}/results.md, results.json, pretrain_curves.png; pre-training run in "
          f"{pretrain} (metrics.jsonl, tensorboard/); stage logs in {out / 'logs'} and {experiment.out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
