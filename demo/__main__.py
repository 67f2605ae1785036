"""`make demo`: the whole pipeline on offline defaults (about 15 minutes on 2 CPU cores): does a DupMAE
bag-of-words head, trained on a frozen encoder, give a better retriever than the same encoder without it?

    python -m demo                      # the offline docstring retrieval set (demo/docstring_corpus.py)
    python -m demo --dataset scifact    # a BEIR folder, or a BEIR name when the network allows

The story is the adaptation experiment of `benchmarks/adaptation.py` on one dataset with two variants
(`experiments.adaptation`): the packaged all-MiniLM-L6-v2 as it is (`none`) and the same model with a DupMAE
bag-of-words head trained on the dataset's corpus (`dupmae`), each scored zero-shot and after the same fine-tuning.
The adaptation recipe keeps the encoder frozen for the whole pre-training (only the new heads train: MLM head,
decoder), so the `dupmae` arm is the packaged encoder plus a BoW head, and after fine-tuning it is the control's
fine-tuned encoder plus that head; pre-training the encoder itself is not what this measures. Stages (each a
subprocess with its own log in OUT/logs; a finished stage is reused on the next run): retrieval set -> Beam
preprocessing of its corpus -> BM25 hard negatives for the training queries -> zero-shot evaluation of the packaged
model -> its fine-tuning (the control) and evaluation -> DupMAE pre-training of the heads with DeepSpeed, with the
retrieval probe -> zero-shot evaluation of the export -> its fine-tuning and evaluation (from a folder holding the
tuned encoder and the BoW head: `experiments.adaptation.with_sparse_half`). Zero-shot rows are compared with
zero-shot ones (the packaged model fused with BM25 by reciprocal rank among them), fine-tuned with fine-tuned. Then
a results table naming each row's model folder and OUT/pretrain_curves.png (loss terms and probe scores over the
pre-training steps).
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


PACKAGED = "packaged all-MiniLM-L6-v2, zero-shot"
HEAD = "packaged + DupMAE BoW head (trained on the frozen encoder), zero-shot"
FUSED = "packaged + BM25 (reciprocal rank, k = 60), zero-shot"
CONTROL = "fine-tuned (control)"
TUNED_HEAD = "fine-tuned (the control's encoder) + the same BoW head"
#: (variant, stage, representation) of each experiment row, zero-shot rows first.
ROWS = {PACKAGED: ("none", "zero-shot", "mean"), HEAD: ("dupmae", "zero-shot", "dupmae"),
        CONTROL: ("none", "fine-tuned", "mean"), TUNED_HEAD: ("dupmae", "fine-tuned", "dupmae")}
FROZEN = ("The encoder stays frozen during the demo's pre-training (only the new heads train), so this measures a "
          "DupMAE BoW head beside the same encoder, not DupMAE pre-training of the encoder.")


def rows(results: dict, fused: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """The demo table, zero-shot rows (the packaged model fused with BM25 among them, when given) then fine-tuned
    ones: the packaged model, and the same encoder with the DupMAE BoW head, zero-shot and after the same
    fine-tuning."""
    table = {name: results[variant][stage][representation] for name, (variant, stage, representation) in ROWS.items()
             if stage in results[variant]}
    if fused is not None:
        table = {**{name: table[name] for name in (PACKAGED, HEAD) if name in table}, FUSED: fused, **table}
    return table


def artifacts(models: dict[tuple[str, str], str]) -> dict[str, str]:
    """The model folder each row scores (`Experiment.models`): loading it reproduces the row."""
    named = {name: models[variant, stage] for name, (variant, stage, _) in ROWS.items() if (variant, stage) in models}
    if (packaged := models.get(("none", "zero-shot"))) is not None:
        named[FUSED] = f"{packaged} (with --fuse bm25)"
    return named


def verdict(table_rows: dict[str, dict[str, float]]) -> str:
    """What the numbers say, in words (nDCG@10): the BoW head's rows against the same encoder without it, zero-shot
    and after the same fine-tuning, and the zero-shot head against the zero-shot fusion with BM25."""
    pairs = ((HEAD, PACKAGED, "zero-shot, the DupMAE BoW head is", "the packaged model alone"),
             (TUNED_HEAD, CONTROL, "after the same fine-tuning, it is", "the control"),
             (HEAD, FUSED, "zero-shot, it is", "the packaged model fused with BM25 (no training)"))
    said = []
    for ours, theirs, subject, other in pairs:
        if ours in table_rows and theirs in table_rows:
            delta = table_rows[ours]["nDCG@10"] - table_rows[theirs]["nDCG@10"]
            word = "better than" if delta > 0 else "worse than" if delta < 0 else "equal to"
            said.append(f"{subject} {word} {other} by {delta:+.4f} nDCG@10")
    return "; ".join(said) + ". " + FROZEN


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
    named = artifacts(experiment.models)
    table = results_table(rows(results, fused), seconds, named) + "\n\n" + verdict(rows(results, fused))
    pretrain = experiment.out / "dupmae" / "pretrain"
    plot_curves({"DupMAE BoW head": pretrain / "metrics.jsonl"}, out / "pretrain_curves.png",
                "DupMAE heads, encoder frozen")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "results": results, "artifacts": named,
                                                  "stage_seconds": seconds}, indent=2) + "\n")
    print("\n" + table + f"\n\nWritten: {out}/results.md, results.json, pretrain_curves.png; pre-training run in "
          f"{pretrain} (metrics.jsonl, tensorboard/); stage logs in {out / 'logs'} and {experiment.out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
