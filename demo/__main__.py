"""`make demo`: the whole DupMAE pipeline on offline defaults, in about 20 minutes on 2 CPU cores.

    python -m demo                      # the offline docstring retrieval set (demo/docstring_corpus.py)
    python -m demo --dataset scifact    # a BEIR folder, or a BEIR name when the network allows

Stages (each a subprocess with its own log in OUT/logs; a finished stage is reused on the next run):
retrieval set -> Beam preprocessing of its corpus -> zero-shot evaluation of the packaged model ->
DupMAE pre-training with DeepSpeed from the packaged model -> hard-negative mining with the packaged
model -> contrastive fine-tuning of the pre-trained encoder -> evaluation. Then a results table and OUT/pretrain_losses.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.logging_setup import setup_logging
from demo.report import dataset_scores, plot_pretrain_losses, results_table
from demo.stages import Stage, StageFailed, run_stage
from evaluation.config import EvalConfig
from evaluation.data import DatasetError, resolve_dataset

logger = logging.getLogger("demo")


@dataclass
class DemoConfig:
    dataset: str | None = None  # BEIR folder or name; None builds the offline docstring set
    output_dir: str = "demo_output"  # everything the demo writes
    max_seq_length: int = 128  # pre-training block length (short: CPU minutes)
    pretrain_steps: int = 120  # DupMAE optimizer steps (about 3 s each on 2 cores)
    pretrain_batch_size: int = 8  # blocks per step
    finetune_steps: int = 40  # fine-tuning optimizer steps (8 queries, 1 positive + 1 hard negative each)
    # mean by default: dupmae scores every passage token over the whole vocabulary, ~10x the CPU time
    representation: str = "mean"  # how the fine-tuned model encodes: cls, mean or dupmae

    def __post_init__(self) -> None:
        if self.representation not in ("cls", "mean", "dupmae"):
            raise ValueError(f"representation must be cls, mean or dupmae, got {self.representation!r}")


def _evaluate(name: str, model: str, representation: list[str], data: str, out: Path) -> Stage:
    return Stage(name, ["python", "-m", "evaluation.beir", "--model_name_or_path", model, *representation,
                        "--datasets", data, "--split", "test", "--output_dir", str(out), "--no_cache"], out)


def _scoring(config: DemoConfig) -> list[str]:
    """Cosine scores need a low temperature; DupMAE's unnormalized dense + sparse dot products do not."""
    if config.representation == "dupmae":
        return ["--temperature", "1.0"]
    return ["--normalize", "--temperature", "0.05"]


def _beir_folder(dataset: str) -> str:
    """A BEIR folder as given, or a bare BEIR name fetched the way evaluation fetches it (network allowing)."""
    data_dir = next(f.default for f in fields(EvalConfig) if f.name == "data_dir")
    return str(resolve_dataset(dataset, data_dir, allow_download=True))


def stages(config: DemoConfig, out: Path) -> list[Stage]:
    """The pipeline, in order; each stage reads what earlier ones wrote."""
    data = _beir_folder(config.dataset) if config.dataset else str(out / "data" / "docstrings")
    shards, pretrain, negatives, finetune = out / "shards", out / "pretrain", out / "negatives", out / "finetune"
    plan = []
    if config.dataset is None:
        plan.append(Stage("build-dataset", ["python", "-m", "demo.docstring_corpus", data], Path(data)))
    plan += [
        Stage("preprocess", ["python", "-m", "preprocessing.pretrain_data", "--input", f"{data}/corpus.jsonl",
                             "--text_fields", "title", "text", "--id_field", "_id", "--output_dir", str(shards),
                             "--max_seq_length", str(config.max_seq_length)], shards),
        # the packaged model as it ships: mean pooling + normalization (its sentence-transformers config)
        _evaluate("evaluate-zero-shot", "default", [], data, out / "eval_zero_shot"),
        Stage("pretrain", ["deepspeed", "--num_gpus", "1", "pretrain/main.py",
                           "--deepspeed", "ds_configs/zero2_cpu.json", "--data_dir", str(shards),
                           "--model_name_or_path", "default", "--output_dir", str(pretrain),
                           "--max_seq_length", str(config.max_seq_length),
                           "--per_device_train_batch_size", str(config.pretrain_batch_size),
                           "--max_steps", str(config.pretrain_steps), "--learning_rate", "1e-4",
                           "--logging_steps", "5", "--save_steps", "40", "--save_total_limit", "1"], pretrain,
              env={"DS_ACCELERATOR": "cpu"}),
        # negatives from the strongest retriever at hand, the packaged model, as fine-tuning recipes do
        Stage("mine-negatives", ["python", "-m", "finetune.mine_negatives", "--model", "default",
                                 "--data_dir", data, "--out", str(negatives / "negatives.jsonl")], negatives),
        Stage("finetune", ["deepspeed", "--num_gpus", "1", "finetune/main.py",
                           "--deepspeed", "ds_configs/finetune_cpu.json", "--data_dir", data,
                           "--model_name_or_path", str(pretrain / "export"),
                           "--representation", config.representation, "--negatives",
                           str(negatives / "negatives.jsonl"), "--max_steps", str(config.finetune_steps),
                           "--per_device_train_batch_size", "8", "--train_group_size", "2",
                           "--passage_max_length", "128", "--logging_steps", "5", *_scoring(config),
                           "--output_dir", str(finetune)], finetune, env={"DS_ACCELERATOR": "cpu"}),
        _evaluate("evaluate-finetuned", str(finetune / "model"), [], data, out / "eval_finetuned"),
    ]
    return plan


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=None, help="BEIR folder or name (default: offline docstring set)")
    parser.add_argument("--output_dir", default=DemoConfig.output_dir)
    parser.add_argument("--pretrain_steps", type=int, default=DemoConfig.pretrain_steps)
    parser.add_argument("--representation", default=DemoConfig.representation)
    config = DemoConfig(**vars(parser.parse_args(argv)))
    out = Path(config.output_dir).resolve()
    seconds = {}
    try:
        for stage in stages(config, out):
            seconds[stage.name] = run_stage(stage, out / "logs")
    except (StageFailed, DatasetError) as failure:
        logger.error("%s", failure)
        return 1
    rows = {"packaged all-MiniLM-L6-v2, zero-shot": dataset_scores(out / "eval_zero_shot" / "results.json"),
            f"+ DupMAE pre-training + fine-tuning ({config.representation})":
                dataset_scores(out / "eval_finetuned" / "results.json")}
    table = results_table(rows, seconds)
    plot_pretrain_losses(out / "pretrain" / "metrics.jsonl", out / "pretrain_losses.png")
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "models": rows,
                                                  "stage_seconds": seconds}, indent=2) + "\n")
    print("\n" + table + f"\n\nWritten: {out}/results.md, results.json, pretrain_losses.png, "
          f"pretrain/tensorboard, finetune/ logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
