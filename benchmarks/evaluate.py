"""Evaluation throughput: our encode + exact search vs the `beir` package's standard dense exact search.

    python benchmarks/evaluate.py [--data_dir ../shared/data/scifact] [--repeats 2] [--max_docs N] [--smoke]

Same model (the packaged all-MiniLM-L6-v2, mean pooling + normalization, max length 256), same data (SciFact
test), same process. Baseline: beir `models.SentenceBERT` + `DenseRetrievalExactSearch` (batch 128, cosine).
Ours: `evaluation.pipeline.Evaluator` (length-sorted token-budget batches, faiss IndexFlatIP), fp32 (--bf16:
bf16 autocast, for hardware with native bf16), no cache.
Timed: query + corpus encoding + search (model and data loading excluded). The two alternate `--repeats`
times, so a machine shared with other jobs slows both alike; figures are medians over the pairs.
Prints one JSON line per figure: corpus docs/s, and nDCG@10 of both (must agree within 0.001).
--max_docs N (quick runs on a busy machine) evaluates both on the same smaller corpus: every judged document plus
the first others up to N; its nDCG@10 compares the two systems but is not SciFact's published figure.
--smoke: one pair on a 16-document BEIR folder written to OUTPUT_DIR/smoke_data (benchmarks/smoke.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import smoke  # noqa: E402
from common.defaults import default_model_path  # noqa: E402
from evaluation.config import EvalConfig  # noqa: E402
from evaluation.data import load_beir  # noqa: E402
from evaluation.metrics import evaluate  # noqa: E402
from evaluation.pipeline import Evaluator  # noqa: E402
from evaluation.search import search  # noqa: E402

BENCH = "evaluate_scifact"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def run_baseline(model_path: str, data_dir: Path, max_length: int):
    """beir's standard exact dense search; returns (seconds, nDCG@10)."""
    from beir.datasets.data_loader import GenericDataLoader
    from beir.retrieval import models
    from beir.retrieval.evaluation import EvaluateRetrieval
    from beir.retrieval.search.dense import DenseRetrievalExactSearch

    corpus, queries, qrels = GenericDataLoader(str(data_dir)).load(split="test")
    retriever = EvaluateRetrieval(
        DenseRetrievalExactSearch(models.SentenceBERT(model_path, max_length=max_length), batch_size=128),
        score_function="cos_sim")
    start = time.perf_counter()
    ranking = retriever.retrieve(corpus, queries)
    seconds = time.perf_counter() - start
    ndcg, _, _, _ = retriever.evaluate(qrels, ranking, [10])
    return seconds, ndcg["NDCG@10"]


def run_ours(model_path: str, data_dir: Path, output_dir: Path, bf16: bool):
    cfg = EvalConfig(datasets=[str(data_dir)], output_dir=str(output_dir), model_name_or_path=model_path,
                     representation="mean", normalize=True, no_cache=True, offline=True, bf16=bf16)
    evaluator = Evaluator(cfg)
    data = load_beir(data_dir, "test")
    start = time.perf_counter()
    corpus = evaluator.encode_corpus(data)
    queries = evaluator.encode_queries(data)
    ranking = search(queries, corpus, cfg.depth)
    seconds = time.perf_counter() - start
    return seconds, evaluate(data.qrels, ranking)["nDCG@10"], len(data.doc_ids), evaluator.max_length


def subset_folder(data_dir: Path, max_docs: int, out: Path) -> Path:
    """A BEIR folder with the judged documents of every split plus the first others, up to max_docs documents."""
    import shutil

    judged = {line.split("\t")[1] for f in (data_dir / "qrels").glob("*.tsv") for line in f.read_text().splitlines()[1:]}
    lines = (data_dir / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    keep = [line for line in lines if json.loads(line)["_id"] in judged]
    keep += [line for line in lines if json.loads(line)["_id"] not in judged][:max(0, max_docs - len(keep))]
    folder = out / "data" / data_dir.name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(data_dir / "qrels", folder / "qrels")
    shutil.copy(data_dir / "queries.jsonl", folder / "queries.jsonl")
    (folder / "corpus.jsonl").write_text("\n".join(keep) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA), help="SciFact BEIR folder")
    parser.add_argument("--repeats", type=int, default=2, help="alternating baseline/ours pairs")
    parser.add_argument("--max_docs", type=int, default=None, help="smaller corpus for quick runs (see above)")
    parser.add_argument("--output_dir", default="/tmp/bench_evaluate", help="scratch folder")
    parser.add_argument("--bf16", action="store_true",
                        help="ours with bf16 autocast (for GPUs and AVX512-BF16/AMX CPUs; the baseline stays fp32)")
    args = smoke.parse_args(parser, data_dir=None, repeats=1)
    logging.basicConfig(level=logging.WARNING)
    data_dir = Path(args.data_dir) if args.data_dir else smoke.tiny_beir(Path(args.output_dir) / "smoke_data")
    model_path = default_model_path()
    if args.max_docs:
        data_dir = subset_folder(data_dir, args.max_docs, Path(args.output_dir))
    pairs, max_length = [], 256  # all-MiniLM-L6-v2's max_seq_length; run_ours reports the one it used
    for repeat in range(args.repeats):
        if repeat % 2:  # alternate who goes first: neither always gets the quieter half of a busy machine
            base_s, base_ndcg = run_baseline(model_path, data_dir, max_length)
        ours_s, ours_ndcg, n_docs, max_length = run_ours(model_path, data_dir, Path(args.output_dir), args.bf16)
        if not repeat % 2:
            base_s, base_ndcg = run_baseline(model_path, data_dir, max_length)
        pairs.append({"ours_docs_per_s": n_docs / ours_s, "baseline_docs_per_s": n_docs / base_s,
                      "ratio": base_s / ours_s})
        print(json.dumps({"bench": BENCH, "pair": len(pairs), **pairs[-1]}), file=sys.stderr, flush=True)
    ours_rate = statistics.median(p["ours_docs_per_s"] for p in pairs)
    base_rate = statistics.median(p["baseline_docs_per_s"] for p in pairs)
    print(json.dumps({"bench": BENCH, "metric": "corpus_docs_per_s", "unit": "docs/s", "ours": round(ours_rate, 2),
                      "baseline": round(base_rate, 2), "ratio": round(ours_rate / base_rate, 3), "better": "higher",
                      "pair_ratios": [round(p["ratio"], 3) for p in pairs], "docs": n_docs,
                      "full_corpus": not args.max_docs, "repeats": args.repeats, "cpu_threads": os.cpu_count(),
                      "bf16": args.bf16, "target_ratio": 1.5, "smoke": args.smoke}))
    print(json.dumps({"bench": BENCH, "metric": "nDCG@10", "unit": "nDCG@10", "ours": round(ours_ndcg, 5),
                      "baseline": round(base_ndcg, 5), "ratio": round(ours_ndcg / base_ndcg, 5), "better": "higher",
                      "abs_diff": round(abs(ours_ndcg - base_ndcg), 5), "tolerance": 0.001, "docs": n_docs,
                      "smoke": args.smoke}))


if __name__ == "__main__":
    main()
