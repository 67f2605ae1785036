"""Pre-training preprocessing throughput: preprocessing.pretrain_data vs the official RetroMAE recipe, two inputs.

    python benchmarks/preprocess.py [--input ../shared/data/gutenberg/books-25MB.jsonl] [--repeats 3]
    python benchmarks/preprocess.py --smoke     # 3 tiny books (benchmarks/smoke.py), `books` only, 1 run per side

Inputs (both about 25 MB, both made offline):
- `books`: --input, the 88 Project Gutenberg books of ../shared/data (one book per line, 16 KB to 666 KB).
- `recut`: built here from the same books: their paragraphs in reverse book order, cut at paragraph
  boundaries into documents of seeded log-uniform sizes between 4 KB and 1 MB. Same words, other documents:
  109 of them, from 4 KB to 1 MB, so the work splits differently across workers.
No other 25 MB of public-domain books can be had without a network, so the second input re-cuts the first.

The baseline does what staoxiao/RetroMAE `examples/pretrain/preprocess.py` does for long documents
(`create_wiki_data`): HF `datasets` `load_dataset` -> `map` sentence split -> batched `map` tokenize (no
special tokens) -> batched `map` pack each document's sentences into blocks -> `save_to_disk`, every map
with `num_proc` = cores; no BoW targets, no word starts. NLTK's punkt needs a download, so both sides split
sentences with preprocessing.text (normalize + split_sentences): the same work on both sides. Every baseline
run starts from a new, empty datasets cache (`cache_dir` and HF_DATASETS_CACHE): `datasets` caches
`load_dataset` and `map` results by fingerprint, so a second run on an old cache would skip the work.

Each side runs as a fresh process timed end to end (interpreter start, imports, tokenizer loading, worker
start-up and exit), --repeats times per input, the two sides alternating which goes first; the best time of
each side counts (the development machines are shared, so single runs are noisy). Both sides must report
the same token count. Prints one JSON line per input, with each run's seconds, CPU seconds (user + sys of
the process tree) and the 1-minute load average before it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import smoke  # noqa: E402

DEFAULT_INPUT = REPO.parent / "shared" / "data" / "gutenberg" / "books-25MB.jsonl"
RECUT_BYTES = (4 * 2**10, 2**20)  # document sizes of the `recut` input: log-uniform between these
RECUT_SEED = 0


def baseline(input_path: str, output_dir: str, tokenizer_path: str, max_seq_length: int, num_proc: int) -> int:
    """The official recipe's create_wiki_data + save_to_disk; returns the number of tokens in its blocks."""
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
    data = load_dataset("json", data_files=input_path, split="train", cache_dir=os.path.join(output_dir, "cache"))
    data = data.map(sentence_split, num_proc=num_proc, remove_columns=data.column_names)
    data = data.map(tokenize, num_proc=num_proc, batched=True, remove_columns=["sentences"])
    data = data.map(pad_each_line, num_proc=num_proc, batched=True, remove_columns=["input_ids"])
    data.save_to_disk(os.path.join(output_dir, "saved"))
    return sum(len(ids) for ids in data["token_ids"])


def write_recut(books: list[bytes], path: Path) -> None:
    """The `recut` input: the books' paragraphs in reverse book order, re-cut into documents of seeded
    log-uniform sizes (a document ends at the first paragraph boundary past its drawn size)."""
    rng = random.Random(RECUT_SEED)
    low, high = (math.log(b) for b in RECUT_BYTES)
    paragraphs = (p for line in reversed(books) for p in json.loads(line)["text"].split("\n\n") if p.strip())
    with open(path, "w") as out:
        document, size, target = [], 0, math.exp(rng.uniform(low, high))
        for paragraph in paragraphs:
            document.append(paragraph)
            size += len(paragraph.encode("utf-8")) + 2
            if size >= target:
                out.write(json.dumps({"text": "\n\n".join(document)}) + "\n")
                document, size, target = [], 0, math.exp(rng.uniform(low, high))
        if document:
            out.write(json.dumps({"text": "\n\n".join(document)}) + "\n")


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


def run_side(side: str, data: Path, run_dir: Path, args: argparse.Namespace, env: dict) -> tuple[float, float, int]:
    """One fresh process of `side` on `data`, writing under the empty `run_dir`: (seconds, CPU seconds, tokens)."""
    out = run_dir / "out"
    if side == "ours":  # the job's defaults: all local cores
        command = [sys.executable, "-m", "preprocessing.pretrain_data", "--input", str(data), "--output_dir",
                   str(out), "--tokenizer", args.tokenizer, "--max_seq_length", str(args.max_seq_length)]
        seconds, cpu_seconds, _ = timed(command, env)
        return seconds, cpu_seconds, json.loads((out / "manifest.json").read_text())["counts"]["tokens"]
    command = [sys.executable, __file__, "--input", str(data), "--baseline_output", str(out), "--tokenizer",
               args.tokenizer, "--max_seq_length", str(args.max_seq_length), "--cores", str(args.cores)]
    fresh_cache = {**env, "HF_DATASETS_CACHE": str(run_dir / "hf_datasets_cache")}
    seconds, cpu_seconds, stdout = timed(command, fresh_cache)
    return seconds, cpu_seconds, int(stdout.strip().splitlines()[-1])


def compare(name: str, data: Path, documents: int, args: argparse.Namespace, env: dict, tmp: Path) -> dict:
    """--repeats interleaved runs of both sides on one input; the JSON line of the best of each."""
    runs: dict[str, dict[str, list]] = {side: {"seconds": [], "cpu": [], "load": []} for side in ("ours", "baseline")}
    tokens: dict[str, int] = {}
    for repeat in range(args.repeats):
        order = ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours")  # alternate against load drift
        for side in order:
            run_dir = tmp / f"{name}-{side}-{repeat}"
            runs[side]["load"].append(round(os.getloadavg()[0], 2))
            seconds, cpu_seconds, tokens[side] = run_side(side, data, run_dir, args, env)
            runs[side]["seconds"].append(round(seconds, 2))
            runs[side]["cpu"].append(round(cpu_seconds, 1))
            shutil.rmtree(run_dir)
    if tokens["ours"] != tokens["baseline"]:
        sys.exit(f"{name}: ours wrote {tokens['ours']} tokens, the baseline {tokens['baseline']}: not the same work")
    ours, base = (tokens[side] / min(runs[side]["seconds"]) for side in ("ours", "baseline"))
    return {
        "bench": "preprocess", "metric": "tokens_per_second", "unit": "tokens/s", "ours": round(ours),
        "baseline": round(base), "ratio": round(ours / base, 3), "better": "higher", "input": name,
        "documents": documents, "bytes": data.stat().st_size, "tokens": tokens["ours"], "cores": args.cores,
        "timing": f"best of {args.repeats}, whole process", "ours_seconds": runs["ours"]["seconds"],
        "baseline_seconds": runs["baseline"]["seconds"], "ours_cpu_seconds": runs["ours"]["cpu"],
        "baseline_cpu_seconds": runs["baseline"]["cpu"], "ours_load_before": runs["ours"]["load"],
        "baseline_load_before": runs["baseline"]["load"], "smoke": args.smoke,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="JSONL of books with a 'text' field per line")
    parser.add_argument("--inputs", nargs="+", default=["books", "recut"], choices=["books", "recut"])
    parser.add_argument("--max_docs", type=int, default=0, help="use only the first N books (0: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and input, interleaved; the best counts")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--tokenizer", default="default", help="tokenizer name or path for both sides")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="baseline num_proc (ours uses all cores)")
    parser.add_argument("--baseline_output", help=argparse.SUPPRESS)  # internal: run the baseline in this process
    args = smoke.parse_args(parser, input=None, inputs=["books"], repeats=1, max_seq_length=64, cores=1)

    from common.defaults import resolve_model

    if args.baseline_output:
        tokenizer = resolve_model(args.tokenizer)
        print(baseline(args.input, args.baseline_output, tokenizer, args.max_seq_length, args.cores))
        return
    if args.input and not Path(args.input).is_file():
        sys.exit(f"input {args.input} not found (the benchmark needs ../shared/data or --input)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        source = args.input or smoke.tiny_books(tmp / "tiny_books.jsonl")  # --smoke
        with open(source, "rb") as src:
            books = list(itertools.islice(src, args.max_docs or None))
        (tmp / "books.jsonl").write_bytes(b"".join(books))
        write_recut(books, tmp / "recut.jsonl")
        for name in args.inputs:
            data = tmp / f"{name}.jsonl"
            with open(data, "rb") as lines:
                documents = sum(1 for _ in lines)
            print(json.dumps(compare(name, data, documents, args, env, tmp)), flush=True)


if __name__ == "__main__":
    main()
