"""The benchmarks' smoke mode: `--smoke` runs a script on a tiny config in seconds, on CPU, without ../shared data,
and prints its JSON lines in the usual format with "smoke": true. It checks that the script runs; its figures
mean nothing. tests/test_benchmarks_smoke.py runs every script this way.

    python benchmarks/collator.py --smoke          # any script; flags given beside --smoke still win
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SMOKE_HELP = "tiny config, seconds, CPU, no ../shared data: checks that the script runs (figures mean nothing)"

#: (passage, query) pairs of the tiny BEIR folder; the passages of NEAR_MISSES share words but do not answer.
TOPICS = [
    ("Vitamin D is produced in the skin when it is exposed to sunlight.", "how does the body make vitamin D"),
    ("Red blood cells carry oxygen bound to hemoglobin.", "what carries oxygen in the blood"),
    ("Type 1 diabetes is an autoimmune destruction of insulin-producing beta cells.", "cause of type 1 diabetes"),
    ("CRISPR-Cas9 cuts DNA at a location chosen by a guide RNA.", "how does CRISPR edit genes"),
    ("Alzheimer's disease is marked by amyloid plaques and tau tangles in the brain.", "brain changes in Alzheimer's"),
    ("Sleep deprivation impairs attention and working memory.", "effects of lack of sleep on the mind"),
    ("Folic acid taken in early pregnancy prevents neural tube defects.", "why take folic acid when pregnant"),
    ("Penicillin kills bacteria by blocking the synthesis of their cell walls.", "how does penicillin work"),
]
NEAR_MISSES = [
    "Vitamin C is found in citrus fruits.",
    "White blood cells fight infections.",
    "Type 2 diabetes is managed with diet and metformin.",
    "Gene sequencing costs have fallen sharply.",
    "Alzheimer's disease affects millions of older adults.",
    "Adults are advised to sleep seven to nine hours.",
    "Pregnancy lasts about forty weeks.",
    "Penicillin was discovered by Alexander Fleming in 1928.",
]


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, **tiny) -> argparse.Namespace:
    """parser's arguments plus --smoke; with --smoke, `tiny` replaces the defaults (explicit flags still win)."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**tiny)
        args = parser.parse_args(argv)
        print(f"{Path(sys.argv[0]).name}: smoke mode, tiny config {tiny}: the figures mean nothing", file=sys.stderr)
    return args


def tiny_beir(folder: Path) -> Path:
    """A BEIR folder of TOPICS and NEAR_MISSES: corpus.jsonl, queries.jsonl, qrels/{train,test}.tsv (the same
    queries in both splits: smoke runs train and test on them)."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [(f"d{i}", passage) for i, (passage, _) in enumerate(TOPICS)]
    docs += [(f"n{i}", passage) for i, passage in enumerate(NEAR_MISSES)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                 for d, t in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": query}) + "\n"
                                                  for i, (_, query) in enumerate(TOPICS)))
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(TOPICS)))
    for split in ("train", "test"):
        (folder / "qrels" / f"{split}.tsv").write_text(qrels)
    return folder


def tiny_books(path: Path, books: int = 3) -> Path:
    """A JSONL of `books` short books ({"text": paragraphs separated by blank lines}) made of TOPICS' passages."""
    sentences = [passage for passage, _ in TOPICS] + NEAR_MISSES
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for b in range(books):
            paragraphs = [" ".join(sentences[(b + p + s) % len(sentences)] for s in range(4)) for p in range(6)]
            out.write(json.dumps({"text": "\n\n".join(paragraphs)}) + "\n")
    return path


def tiny_bert(folder: Path) -> Path:
    """A random-init 2-layer, 32-wide BertForMaskedLM with the packaged MiniLM's tokenizer: a model every stage
    loads in a second (the smoke runs of scripts whose default model is the packaged one)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=len(tokenizer),
                                           max_position_embeddings=160))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
