"""Quality bar: fine-tuning the packaged all-MiniLM-L6-v2 (mean pooling, normalized, as it was trained) on SciFact
train with mined hard negatives must beat its zero-shot SciFact test nDCG@10 (0.645 as published), on CPU.

    python benchmarks/finetune_scifact.py [--scifact_dir ../shared/data/scifact] [--output_dir runs/finetune_scifact]
    python benchmarks/finetune_scifact.py --smoke --output_dir /tmp/ft_smoke   # 16 documents, 8 queries, 2 steps

1. Zero-shot: encode the corpus once (evaluation's encoder, --max_length tokens); score the test queries
   (the baseline) and retrieve the top --depth documents of every train query with the same embeddings.
2. Mining: drop each train query's positives and its --skip_top best other documents (finetune.mine_negatives).
3. Fine-tune with the product's CLI (`python finetune/main.py`, DeepSpeed, one CPU process, gloo).
4. Evaluate the export the same way as the baseline (same truncation, same search and pytrec_eval metrics).
Prints one JSON line; the exported model stays in OUTPUT_DIR/train/model. Both sides are truncated at
--max_length (128 by default, to fit the CPU budget), so `baseline` is this run's zero-shot, not the 0.645 above.
--smoke runs every stage on a tiny BEIR folder written to OUTPUT_DIR/smoke_data (benchmarks/smoke.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks import smoke  # noqa: E402

DEFAULT_SCIFACT = REPO.parent / "shared" / "data" / "scifact"
PUBLISHED_ZERO_SHOT = 0.645  # all-MiniLM-L6-v2 SciFact test nDCG@10 (MTEB / BEIR, 256 tokens)


def evaluate_model(model: str | None, scifact: Path, max_length: int, out: Path, train_depth: int = 0):
    """(test nDCG@10, train queries' rankings or None) for a model, mean pooling + normalization."""
    from evaluation.config import EvalConfig
    from evaluation.data import load_beir
    from evaluation.metrics import evaluate
    from evaluation.pipeline import Evaluator
    from evaluation.search import search

    cfg = EvalConfig(datasets=[str(scifact)], output_dir=str(out), model_name_or_path=model, representation="mean",
                     normalize=True, max_length=max_length, no_cache=True)
    evaluator = Evaluator(cfg)
    test = load_beir(scifact, "test")
    corpus = evaluator.encode_corpus(test)
    ndcg = evaluate(test.qrels, search(evaluator.encode_queries(test), corpus, 100))["nDCG@10"]
    if not train_depth:
        return ndcg, None
    train = load_beir(scifact, "train")
    return ndcg, (train, search(evaluator.encode_queries(train), corpus, train_depth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scifact_dir", default=str(DEFAULT_SCIFACT), help="SciFact BEIR folder")
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "finetune_scifact"), help="kept after the run")
    parser.add_argument("--max_length", type=int, default=128, help="document truncation at evaluation and mining")
    parser.add_argument("--passage_max_length", type=int, default=128, help="passage truncation in training")
    parser.add_argument("--depth", type=int, default=200, help="documents retrieved per train query for mining")
    parser.add_argument("--skip_top", type=int, default=3, help="best non-positive documents not used as negatives")
    parser.add_argument("--train_group_size", type=int, default=2, help="1 positive + hard negatives per query")
    parser.add_argument("--batch_size", type=int, default=16, help="train queries per step")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.05, help="the model's training scale 20 = 1/0.05")
    parser.add_argument("--epochs", type=int, default=1)
    args = smoke.parse_args(parser, scifact_dir=None, max_length=32, passage_max_length=32, depth=10, skip_top=1,
                            batch_size=4)
    out = Path(args.output_dir)
    scifact = Path(args.scifact_dir) if args.scifact_dir else out / "smoke_data"
    if args.scifact_dir and not all((scifact / name).is_file() for name in ("corpus.jsonl", "qrels/train.tsv")):
        sys.exit(f"error: {scifact} is not the SciFact BEIR folder (corpus.jsonl, qrels/train.tsv); "
                 "pass --scifact_dir")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from common.logging_setup import setup_logging
    from finetune.mine_negatives import hard_negatives, write_negatives

    setup_logging()
    start = time.time()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if not args.scifact_dir:
        smoke.tiny_beir(scifact)
    baseline, (train, ranking) = evaluate_model(None, scifact, args.max_length, out / "zero_shot", args.depth)
    minutes_zero_shot = (time.time() - start) / 60
    negatives = {qid: hard_negatives(list(ranking[qid]), [d for d, r in train.qrels[qid].items() if r > 0],
                                     args.skip_top) for qid in train.query_ids}
    write_negatives(out / "negatives.jsonl", negatives)
    command = [sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
               "--model_name_or_path", "default", "--representation", "mean", "--normalize", "--data_dir",
               str(scifact), "--negatives", str(out / "negatives.jsonl"), "--output_dir", str(out / "train"),
               "--train_group_size", str(args.train_group_size), "--per_device_train_batch_size",
               str(args.batch_size), "--learning_rate", str(args.learning_rate), "--temperature",
               str(args.temperature), "--num_train_epochs", str(args.epochs), "--passage_max_length",
               str(args.passage_max_length), "--logging_steps", "5", "--save_steps", "100000", "--seed", "42"]
    train_start = time.time()
    # its log goes to stderr: stdout carries only the JSON line
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=sys.stderr)
    minutes_train = (time.time() - train_start) / 60
    model_dir = out / "train" / "model"
    ours, _ = evaluate_model(str(model_dir), scifact, args.max_length, out / "fine_tuned")
    print(json.dumps({
        "bench": "finetune_scifact", "metric": "SciFact test nDCG@10", "unit": "nDCG@10", "ours": round(ours, 4),
        "baseline": round(baseline, 4), "ratio": round(ours / baseline, 4), "better": "higher",
        "minutes": round((time.time() - start) / 60, 2), "minutes_zero_shot_and_mining": round(minutes_zero_shot, 2),
        "minutes_train": round(minutes_train, 2), "beats_published_zero_shot": ours > PUBLISHED_ZERO_SHOT,
        "published_zero_shot": PUBLISHED_ZERO_SHOT, "max_length": args.max_length, "model_dir": str(model_dir),
        "train_queries": len(train.query_ids), "smoke": args.smoke,
        "settings": {k: v for k, v in vars(args).items() if k not in ("scifact_dir", "output_dir", "smoke")},
    }))


if __name__ == "__main__":
    main()
