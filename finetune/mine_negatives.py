"""Hard negatives for fine-tuning: retrieve the top `depth` documents of every training query with a model
(evaluation's encoder and search: exact faiss inner product, or DupMAE's dense + sparse score searched exactly) or
with BM25 (`common.bm25`: Anserini's BEIR baseline by default, `--bm25`), drop the positives and the `skip_top` best remaining documents (often
unlabeled positives), and write the ranked rest.

Launch:  python -m finetune.mine_negatives --model M --data_dir D --out negs.jsonl [--representation mean --normalize]
Output:  one JSON line per training query, best first: {"query_id": "q1", "negatives": ["d7", "d3", ...]}
         malformed input records go to <out>.dead_letter.jsonl.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.bm25 import PRESET_HELP, bm25_search, preset
from common.flags import optional_bool
from common.precision import bf16_field, decide_bf16, parse_bf16
from common.representation import Encoder
from finetune.config import arg
from finetune.data import DeadLetter, load_beir

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    model: str = arg("default", "model folder to retrieve with ('default' = packaged MiniLM); unused by bm25")
    data_dir: str = arg("", "BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    out: str = arg("", "output JSONL: {query_id, negatives: [ranked doc ids]}")
    split: str = arg("train", "qrels split whose queries get negatives")
    method: Literal["dense", "bm25"] = arg("dense", "retrieve with the model, or with BM25 (common.bm25)")
    bm25: Literal["standard", "bm25s-defaults"] = arg("standard", "--method bm25: " + PRESET_HELP)
    representation: Literal["cls", "mean", "dupmae"] | None = arg(None, "override the folder's representation")
    normalize: bool | None = optional_bool("L2-normalize the dense part; None: the model's")
    depth: int = arg(200, "documents retrieved per query")
    skip_top: int = arg(3, "best-ranked non-positive documents skipped (likely unlabeled positives)")
    query_max_length: int = arg(32, "query tokens, [CLS]/[SEP] included")
    passage_max_length: int = arg(144, "passage tokens (title + text), [CLS]/[SEP] included")
    batch_size: int = arg(128, "most texts per encoder forward pass")
    max_tokens: int = arg(8192, "token budget per forward pass (rows x longest row), as evaluation's default")
    bf16: str = bf16_field("bf16 autocast for encoding: auto (where the device has native bf16; common.precision), "
                           "true, false")

    def __post_init__(self) -> None:
        if not self.data_dir or not self.out:
            raise ValueError("--data_dir and --out are required")
        if min(self.depth, self.batch_size, self.max_tokens) < 1 or self.skip_top < 0:
            raise ValueError("need --depth, --batch_size, --max_tokens >= 1 and --skip_top >= 0")
        self.bf16 = parse_bf16(self.bf16)


def dense_search(cfg: MiningConfig, queries: list[str], corpus: list[str]) -> list[list[int]]:
    """Each query's top-`depth` corpus positions by the model's own score (evaluation's encoder and search)."""
    from common.representation import resolve_config
    from common.tokenizer import load_tokenizer
    from evaluation.encode import encode_texts
    from evaluation.search import search

    rep = resolve_config(cfg.model, kind=cfg.representation, normalize=cfg.normalize)
    encoder, tokenizer = Encoder.from_pretrained(cfg.model, rep), load_tokenizer(cfg.model)
    positions = [str(i) for i in range(len(corpus))]  # ids that never equal a query's (search drops those)
    choice = decide_bf16(cfg.bf16, next(encoder.parameters()).device)
    choice.log(logger, "mining")
    options = {"max_tokens": cfg.max_tokens, "batch_size": cfg.batch_size, "bf16": choice.enabled}
    q = encode_texts(encoder, tokenizer, [f"q{i}" for i in range(len(queries))], queries, documents=False,
                     max_length=cfg.query_max_length, desc="queries", **options)
    d = encode_texts(encoder, tokenizer, positions, corpus, documents=True, max_length=cfg.passage_max_length,
                     desc="corpus", **options)
    hits = search(q, d, cfg.depth, sparse_weight=encoder.config.sparse_weight)
    return [[int(doc) for doc in ranked] for ranked in hits.values()]


def hard_negatives(ranked: list[str], positives: list[str], skip_top: int) -> list[str]:
    """The ranked ids without the positives and without the `skip_top` best of the rest."""
    banned = set(positives)
    return [doc_id for doc_id in ranked if doc_id not in banned][skip_top:]


def write_negatives(path: str | Path, negatives: dict[str, list[str]]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for query_id, doc_ids in negatives.items():
            out.write(json.dumps({"query_id": query_id, "negatives": doc_ids}) + "\n")


def mine(cfg: MiningConfig) -> dict[str, list[str]]:
    """Write the negatives file; returns query id -> negatives."""
    dead_letter = DeadLetter(f"{cfg.out}.dead_letter.jsonl")
    data = load_beir(cfg.data_dir, cfg.split, None, dead_letter)
    doc_ids = list(data.corpus)
    queries = [data.queries[g.query_id] for g in data.groups]
    corpus = [data.corpus[d] for d in doc_ids]
    if cfg.method == "bm25":
        ranked = bm25_search(queries, corpus, cfg.depth, preset(cfg.bm25))
    else:
        ranked = dense_search(cfg, queries, corpus)
    negatives = {g.query_id: hard_negatives([doc_ids[i] for i in positions], g.positives, cfg.skip_top)
                 for g, positions in zip(data.groups, ranked)}
    write_negatives(cfg.out, negatives)
    logger.info("wrote hard negatives of %d queries to %s (%d malformed records skipped)", len(negatives), cfg.out,
                dead_letter.count)
    return negatives


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from common.logging_setup import setup_logging

    setup_logging()
    (cfg,) = HfArgumentParser(MiningConfig).parse_args_into_dataclasses(argv)
    mine(cfg)


if __name__ == "__main__":
    sys.exit(main())
