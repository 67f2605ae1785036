"""Pre-training preprocessing throughput: preprocessing.pretrain_data vs the official RetroMAE recipe.

    python benchmarks/preprocess.py [--input ../shared/data/gutenberg/books-25MB.jsonl] [--max_docs 30]

The baseline does what staoxiao/RetroMAE `examples/pretrain/preprocess.py` does for long documents
(`create_wiki_data`): HF `datasets` `load_dataset` -> `map` sentence split -> batched `map` tokenize (no
special tokens) -> batched `map` pack each document's sentences into blocks -> `save_to_disk`, every map
with `num_proc` = cores; no BoW targets, no word starts. NLTK's punkt needs a download, so both sides split
sentences with preprocessing.text (normalize + split_sentences): the same work on both sides.
Each side runs as a fresh process on the same input (the first --max_docs lines), timed end to end
(imports, tokenizer loading and worker start-up included), --repeats times alternating which side goes
first; the best time of each side counts (the dev machines are shared, so single runs are noisy). Prints
one JSON line. Both sides must report the same token count: same splitter, same tokenizer.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "gutenberg" / "books-25MB.jsonl"


def baseline(input_path: str, output_dir: str, tokenizer_path: str, max_seq_length: int, num_proc: int) -> int:
    """The official recipe's create_wiki_data + save_to_disk; returns the number of tokens in its blocks."""
    import random

    from datasets import load_dataset
    from transformers import AutoTokenizer

    from preprocessing.text import normalize, split_sentences

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    target_length = max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)

    def sentence_split(example):
        return {"sentences": split_sentences(normalize(example["text"]))}

    def tokenize(examples):
        return {
            "input_ids": [
                tokenizer(s, add_special_tokens=False, truncation=False, return_attention_mask=False,
                          return_token_type_ids=False)["input_ids"]
                for s in examples["sentences"]
            ]
        }

    def pad_each_line(examples):  # the official packing loop (short_seq_prob 0)
        blocks = []
        for sents in examples["input_ids"]:
            curr_block = []
            for sent in sents:
                if len(curr_block) >= target_length:
                    blocks.append(curr_block)
                    curr_block = []
                curr_block.extend(sent)
            if curr_block:
                blocks.append(curr_block)
        return {"token_ids": blocks}

    random.seed(0)
    cache = os.path.join(output_dir, "cache")
    data = load_dataset("json", data_files=input_path, split="train", cache_dir=cache)
    data = data.map(sentence_split, num_proc=num_proc, remove_columns=data.column_names)
    data = data.map(tokenize, num_proc=num_proc, batched=True, remove_columns=["sentences"])
    data = data.map(pad_each_line, num_proc=num_proc, batched=True, remove_columns=["input_ids"])
    data.save_to_disk(os.path.join(output_dir, "saved"))
    return sum(len(ids) for ids in data["token_ids"])


def rounded(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def timed(command: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + sys of the process tree, less sensitive to a busy machine), stdout."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="JSONL with a 'text' field per line")
    parser.add_argument("--max_docs", type=int, default=40, help="use only the first N lines (0: all 88 books)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; the best counts")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--tokenizer", default="default", help="tokenizer name or path for both sides")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="baseline num_proc (ours uses all cores)")
    parser.add_argument("--baseline_output", help=argparse.SUPPRESS)  # internal: run the baseline in this process
    args = parser.parse_args()

    from common.defaults import resolve_model

    if args.baseline_output:
        tokenizer = resolve_model(args.tokenizer)
        print(baseline(args.input, args.baseline_output, tokenizer, args.max_seq_length, args.cores))
        return
    if not Path(args.input).is_file():
        sys.exit(f"input {args.input} not found (the benchmark needs ../shared/data or --input)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    cpu: dict[str, list[float]] = {"ours": [], "baseline": []}
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "input.jsonl"
        with open(args.input, "rb") as src, open(data, "wb") as dst:
            lines = list(itertools.islice(src, args.max_docs or None))
            dst.writelines(lines)
        for repeat in range(args.repeats):
            order = ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours")  # alternate against load drift
            for side in order:
                out = Path(tmp) / f"{side}-{repeat}"
                if side == "ours":
                    seconds, cpu_seconds, _ = timed(  # the job's defaults: all local cores
                        [sys.executable, "-m", "preprocessing.pretrain_data", "--input", str(data),
                         "--output_dir", str(out), "--tokenizer", args.tokenizer,
                         "--max_seq_length", str(args.max_seq_length)],
                        env,
                    )
                    tokens[side] = json.loads((out / "manifest.json").read_text())["counts"]["tokens"]
                else:
                    seconds, cpu_seconds, stdout = timed(
                        [sys.executable, __file__, "--input", str(data), "--baseline_output", str(out), "--tokenizer",
                         args.tokenizer, "--max_seq_length", str(args.max_seq_length), "--cores", str(args.cores)],
                        env,
                    )
                    tokens[side] = int(stdout.strip().splitlines()[-1])
                times[side].append(seconds)
                cpu[side].append(cpu_seconds)
                shutil.rmtree(out)
    ours, base = tokens["ours"] / min(times["ours"]), tokens["baseline"] / min(times["baseline"])
    print(json.dumps({
        "bench": "preprocess", "metric": "tokens_per_second", "unit": "tokens/s", "ours": round(ours),
        "baseline": round(base), "ratio": round(ours / base, 3), "better": "higher", "input": args.input,
        "documents": len(lines), "cores": args.cores, "timing": f"best of {args.repeats}, end to end",
        "ours_seconds": rounded(times["ours"]), "baseline_seconds": rounded(times["baseline"]),
        "ours_cpu_seconds": rounded(cpu["ours"]), "baseline_cpu_seconds": rounded(cpu["baseline"]),
        "ours_tokens": tokens["ours"], "baseline_tokens": tokens["baseline"], "load_average_1min": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
