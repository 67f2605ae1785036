"""bf16 against fp32 on this CPU, in one run: the pre-training step and SciFact evaluation.

    python benchmarks/bf16_cpu.py                          # needs a CPU with amx_bf16; else says so and exits 0
    python benchmarks/bf16_cpu.py --force --max_docs 500   # any CPU; a SciFact subset
    python benchmarks/bf16_cpu.py --smoke                  # tiny model and made-up data, seconds

Pre-training step: `pretrain.trainer.build_engine` (ZeRO-2, our AdamW) on ds_configs/zero2.json with `--bf16 true`
and `--bf16 false`, the packaged MiniLM with its new MLM head and decoder, seq --seq_len, batch --batch_size,
shard-like rows of random ids; --warmup_steps untimed, then --steps timed optimizer steps; figure: samples/s.
Evaluation: `evaluation.pipeline.Evaluator` (mean pooling, normalized, no cache) on SciFact's test queries, with
the corpus cut to --max_docs documents (every judged one kept first) when given; figure: corpus documents/s of
encoding, beside nDCG@10 of each precision. The two precisions alternate for --repeats rounds (order swapped each
round) so load from other processes hits both alike; each figure is the median over rounds, the runs are listed.
Each figure comes twice: per wall second, and per CPU second of this process (steadier on a shared machine).

One JSON line per figure: {"bench", "metric", "unit", "ours" (bf16), "baseline" (fp32), "ratio": ours/baseline,
"better", ..., "cpu_flags"}. Without amx_bf16 (and without --force / --smoke) it prints one "skipped" line
with the CPU flags and exits 0: the targets are AMX figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.host_allocator import configure_host_allocator  # noqa: E402

configure_host_allocator()  # as pretrain/main.py does, before torch's first allocation

import torch  # noqa: E402

from common.precision import cpu_flags  # noqa: E402

BENCH = "bf16_cpu"
#: CPU flags copied into every line (which of them the CPU reports).
FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"
TINY_WORDS = "protein cell gene cancer brain heart virus drug blood liver bone skin lung kidney muscle".split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model folder; 'default' = the packaged MiniLM")
    parser.add_argument("--seq_len", type=int, default=128, help="pre-training block length ([CLS]/[SEP] included)")
    parser.add_argument("--batch_size", type=int, default=16, help="pre-training samples per step")
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed pre-training steps per round")
    parser.add_argument("--data", default=str(SCIFACT), help="BEIR folder for the evaluation figure")
    parser.add_argument("--max_docs", type=int, default=None, help="corpus subset (judged documents first)")
    parser.add_argument("--max_queries", type=int, default=None, help="test queries subset")
    parser.add_argument("--max_length", type=int, default=None, help="evaluation truncation; None: the model's")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of fp32 + bf16")
    parser.add_argument("--skip", choices=["pretrain", "eval"], default=None, help="leave one figure out")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--force", action="store_true", help="run on a CPU without amx_bf16 too")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random model and made-up data, seconds, any CPU (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seq_len, args.batch_size, args.warmup_steps, args.steps, args.repeats = 32, 4, 1, 2, 1
    return args


def cpu_info() -> dict:
    flags = cpu_flags()
    name = platform.processor()
    try:
        name = next(line.partition(":")[2].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "cpu_flags": {flag: flag in flags for flag in FLAGS}, "threads": torch.get_num_threads()}


def line(metric: str, unit: str, bf16_runs: list[float], fp32_runs: list[float], better: str, **extra) -> str:
    ours, baseline = statistics.median(bf16_runs), statistics.median(fp32_runs)
    return json.dumps({"bench": BENCH, "metric": metric, "unit": unit, "ours": float(f"{ours:.4g}"),
                       "baseline": float(f"{baseline:.4g}"), "ratio": round(ours / baseline, 4), "better": better,
                       "ours_name": "bf16", "baseline_name": "fp32",
                       "ours_runs": [float(f"{v:.4g}") for v in bf16_runs],
                       "baseline_runs": [float(f"{v:.4g}") for v in fp32_runs], **extra})


def rounds(repeats: int):
    """(round, precision) in alternating order: fp32 bf16, bf16 fp32, ..."""
    for r in range(repeats):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            yield r, bf16


# ------------------------------------------------------------------------------------------ tiny assets
def tiny_model(folder: Path) -> str:
    """A 2-layer, 32-wide BERT with an MLM head and the packaged MiniLM tokenizer, random weights."""
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("default")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_beir(folder: Path) -> Path:
    """30 made-up documents, 5 queries, 2 judged documents each."""
    import numpy as np

    rng = np.random.default_rng(0)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(TINY_WORDS, 6 + i % 20))} for i in range(30)]
    queries = [{"_id": f"q{j}", "text": " ".join(rng.choice(TINY_WORDS, 3))} for j in range(5)]
    write_beir(folder, docs, queries, {f"q{j}": {f"d{3 * j}": 1, f"d{3 * j + 1}": 1} for j in range(5)})
    return folder


def write_beir(folder: Path, docs: list[dict], queries: list[dict], qrels: dict[str, dict[str, int]]) -> None:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = "".join(f"{q}\t{d}\t{s}\n" for q, rel in qrels.items() for d, s in rel.items())
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)


def subset_beir(source: Path, folder: Path, max_docs: int | None, max_queries: int | None) -> Path:
    """The BEIR folder cut to max_queries test queries and max_docs documents (their judged ones first)."""
    if max_docs is None and max_queries is None:
        return source
    qrels: dict[str, dict[str, int]] = {}
    for row in (source / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        q, d, s = row.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    kept_q = list(qrels)[:max_queries] if max_queries else list(qrels)
    qrels = {q: qrels[q] for q in kept_q}
    docs = [json.loads(x) for x in (source / "corpus.jsonl").read_text().splitlines() if x.strip()]
    judged = {d for rel in qrels.values() for d in rel}
    ordered = [d for d in docs if d["_id"] in judged] + [d for d in docs if d["_id"] not in judged]
    docs = ordered[:max_docs] if max_docs else ordered
    kept_d = {d["_id"] for d in docs}
    qrels = {q: {d: s for d, s in rel.items() if d in kept_d} for q, rel in qrels.items()}
    qrels = {q: rel for q, rel in qrels.items() if rel}
    queries = [json.loads(x) for x in (source / "queries.jsonl").read_text().splitlines() if x.strip()]
    write_beir(folder, docs, [q for q in queries if q["_id"] in qrels], qrels)
    return folder


# ---------------------------------------------------------------------------------------- the figures
def pretrain_rounds(args, model_path: str, work: Path) -> tuple[dict[bool, list[float]], dict[bool, list[float]]]:
    """({bf16: [samples/s per round]}, {bf16: [samples per CPU second]}) of ZeRO-2 optimizer steps through
    pretrain.trainer.build_engine."""
    import deepspeed

    from benchmarks.full_logits import random_rows
    from benchmarks.gpu_pretrain import init_deepspeed
    from common.tokenizer import load_tokenizer
    from pretrain.arguments import TrainingArguments
    from pretrain.collator import CollatorConfig, DupMAECollator
    from pretrain.modeling import DupMAEConfig, DupMAEModel
    from pretrain.trainer import build_engine

    if "MASTER_PORT" not in os.environ:  # a free port: other single-process runs (tests, benchmarks) may be running
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    init_deepspeed("cpu")
    tokenizer = load_tokenizer(model_path)
    collator = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.seq_len))
    n = args.batch_size * (args.warmup_steps + args.steps)
    rows = random_rows(n, args.seq_len - 2, len(tokenizer), seed=0)
    batches = [collator(rows[s:s + args.batch_size], torch.Generator().manual_seed(s))
               for s in range(0, n, args.batch_size)]
    results: dict[bool, list[float]] = {False: [], True: []}
    per_cpu: dict[bool, list[float]] = {False: [], True: []}
    for r, bf16 in rounds(args.repeats):
        torch.manual_seed(0)
        model = DupMAEModel.from_pretrained(model_path, DupMAEConfig())
        training = TrainingArguments(output_dir=str(work / "pretrain"), deepspeed=str(ROOT / "ds_configs/zero2.json"),
                                     per_device_train_batch_size=args.batch_size, max_steps=len(batches),
                                     bf16="true" if bf16 else "false")
        engine = build_engine(model, training, world_size=1, total_steps=len(batches))
        try:
            for step, batch in enumerate(batches):
                if step == args.warmup_steps:
                    start, cpu_start = time.perf_counter(), time.process_time()
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        finally:
            engine.destroy()
            del engine, model
            deepspeed.comm.barrier()
        results[bf16].append(args.batch_size * args.steps / seconds)
        per_cpu[bf16].append(args.batch_size * args.steps / cpu_seconds)
        print(f"pretrain round {r} {'bf16' if bf16 else 'fp32'}: {results[bf16][-1]:.3f} samples/s, "
              f"{per_cpu[bf16][-1]:.3f} samples/CPU-s, last loss {out.loss.item():.4f}", file=sys.stderr, flush=True)
    return results, per_cpu


def eval_rounds(args, model_path: str, data: Path, work: Path):
    """({bf16: [corpus docs/s per round]}, {bf16: [docs per CPU second]}, {bf16: nDCG@10}, documents) with
    evaluation's Evaluator."""
    from evaluation.config import EvalConfig
    from evaluation.data import load_beir
    from evaluation.metrics import evaluate
    from evaluation.pipeline import Evaluator
    from evaluation.search import search

    beir = load_beir(data, "test")
    speed: dict[bool, list[float]] = {False: [], True: []}
    per_cpu: dict[bool, list[float]] = {False: [], True: []}
    ndcg: dict[bool, float] = {}
    evaluators = {}
    for r, bf16 in rounds(args.repeats):
        if bf16 not in evaluators:
            evaluators[bf16] = Evaluator(EvalConfig(
                datasets=[str(data)], output_dir=str(work / "eval"), model_name_or_path=model_path,
                representation="mean", normalize=True, no_cache=True, offline=True, device="cpu",
                max_length=args.max_length, bf16="true" if bf16 else "false"))
        evaluator = evaluators[bf16]
        start, cpu_start = time.perf_counter(), time.process_time()
        corpus = evaluator.encode_corpus(beir)
        speed[bf16].append(len(beir.doc_ids) / (time.perf_counter() - start))
        per_cpu[bf16].append(len(beir.doc_ids) / (time.process_time() - cpu_start))
        if bf16 not in ndcg:
            ranking = search(evaluator.encode_queries(beir), corpus, 100)
            ndcg[bf16] = evaluate(beir.qrels, ranking)["nDCG@10"]
        print(f"eval round {r} {'bf16' if bf16 else 'fp32'}: {speed[bf16][-1]:.2f} docs/s, "
              f"{per_cpu[bf16][-1]:.2f} docs/CPU-s, "
              f"nDCG@10 {ndcg[bf16]:.5f}", file=sys.stderr, flush=True)
    return speed, per_cpu, ndcg, len(beir.doc_ids)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = cpu_info()
    if not info["cpu_flags"]["amx_bf16"] and not (args.force or args.smoke):
        print(json.dumps({"bench": BENCH, "metric": "skipped", "reason": "this CPU reports no amx_bf16: the "
                          "targets are AMX figures (--force runs anyway)", **info}), flush=True)
        return 0
    common = {**info, "torch": torch.__version__, "repeats": args.repeats, **({"smoke": True} if args.smoke else {})}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = tiny_model(work / "tiny_model") if args.smoke else args.model
        if args.skip != "pretrain":
            started = time.monotonic()
            runs, per_cpu = pretrain_rounds(args, model_path, work)
            setup = dict(model=model_path, seq_len=args.seq_len, batch=args.batch_size, steps=args.steps,
                         engine="ZeRO-2 (ds_configs/zero2.json)", wall_s=round(time.monotonic() - started, 1), **common)
            print(line("pretrain_samples_per_s", "samples/s", runs[True], runs[False], "higher", **setup), flush=True)
            print(line("pretrain_samples_per_cpu_s", "samples/CPU-s", per_cpu[True], per_cpu[False], "higher",
                       **setup), flush=True)
        if args.skip != "eval":
            started = time.monotonic()
            data = tiny_beir(work / "beir") if args.smoke else subset_beir(
                Path(args.data), work / "beir_subset", args.max_docs, args.max_queries)
            speed, per_cpu, ndcg, docs = eval_rounds(args, model_path, data, work)
            setup = dict(model=model_path, dataset=Path(args.data).name if not args.smoke else "tiny", docs=docs,
                         ndcg10_bf16=round(ndcg[True], 5), ndcg10_fp32=round(ndcg[False], 5),
                         ndcg10_delta=round(ndcg[True] - ndcg[False], 5), representation="mean normalized",
                         wall_s=round(time.monotonic() - started, 1), **common)
            print(line("eval_docs_per_s", "docs/s", speed[True], speed[False], "higher", **setup), flush=True)
            print(line("eval_docs_per_cpu_s", "docs/CPU-s", per_cpu[True], per_cpu[False], "higher", **setup),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
