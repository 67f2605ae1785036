"""Hard negatives for fine-tuning: retrieve the top `depth` documents of every training query with a model
(exact faiss inner-product search; DupMAE's dense + sparse score is searched exactly, corpus chunk by chunk) or
with BM25 (the `bm25s` package), drop the positives and the `skip_top` best remaining documents (often
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
from typing import Iterator, Literal

import torch
from tqdm import tqdm

from common.representation import Encoder, Representation, RepresentationConfig, score
from finetune.config import arg
from finetune.data import Collator, DeadLetter, Text, load_beir

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    model: str = arg("default", "model folder to retrieve with ('default' = packaged MiniLM); unused by bm25")
    data_dir: str = arg("", "BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    out: str = arg("", "output JSONL: {query_id, negatives: [ranked doc ids]}")
    split: str = arg("train", "qrels split whose queries get negatives")
    method: Literal["dense", "bm25"] = arg("dense", "retrieve with the model, or with BM25 (bm25s)")
    representation: Literal["cls", "mean", "dupmae"] | None = arg(None, "override the folder's representation")
    normalize: bool = arg(False, "with --representation: L2-normalize the dense part")
    depth: int = arg(200, "documents retrieved per query")
    skip_top: int = arg(3, "best-ranked non-positive documents skipped (likely unlabeled positives)")
    query_max_length: int = arg(32, "query tokens, [CLS]/[SEP] included")
    passage_max_length: int = arg(144, "passage tokens (title + text), [CLS]/[SEP] included")
    batch_size: int = arg(64, "texts per encoder forward pass")

    def __post_init__(self) -> None:
        if not self.data_dir or not self.out:
            raise ValueError("--data_dir and --out are required")
        if self.depth < 1 or self.skip_top < 0 or self.batch_size < 1:
            raise ValueError("need --depth >= 1, --skip_top >= 0 and --batch_size >= 1")


def encode_batches(encoder: Encoder, collator: Collator, texts: list[Text], max_length: int,
                   batch_size: int, desc: str) -> Iterator[tuple[list[int], Representation]]:
    """(positions, representation) per batch, longest texts first so batches pad little."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    encoder.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            positions = order[start:start + batch_size]
            yield positions, encoder(**collator.encode([texts[i] for i in positions], max_length))


def encode(encoder: Encoder, collator: Collator, texts: list[Text], max_length: int, batch_size: int,
           desc: str = "encode") -> Representation:
    """All texts' representations in input order (the vocab part is [N, V]: for queries, not corpora)."""
    dense, vocab = [None] * len(texts), [None] * len(texts)
    for positions, rep in encode_batches(encoder, collator, texts, max_length, batch_size, desc):
        for row, i in enumerate(positions):
            dense[i] = rep.dense[row]
            vocab[i] = None if rep.vocab is None else rep.vocab[row]
    return Representation(torch.stack(dense), None if vocab[0] is None else torch.stack(vocab))


def dense_search(encoder: Encoder, collator: Collator, queries: list[Text], corpus: list[Text], depth: int,
                 cfg: MiningConfig) -> list[list[int]]:
    """Each query's top-`depth` corpus positions by the encoder's score, best first."""
    import faiss

    q = encode(encoder, collator, queries, cfg.query_max_length, cfg.batch_size, "queries")
    if q.vocab is None:
        d = encode(encoder, collator, corpus, cfg.passage_max_length, cfg.batch_size, "corpus")
        index = faiss.IndexFlatIP(d.dense.shape[1])
        index.add(d.dense.float().numpy())
        return index.search(q.dense.float().numpy(), depth)[1].tolist()
    # dupmae: exact dense + sparse score, merged chunk by chunk so the [N, V] corpus matrix never exists.
    best = torch.full((len(queries), 0), float("-inf")), torch.zeros((len(queries), 0), dtype=torch.long)
    for positions, d in encode_batches(encoder, collator, corpus, cfg.passage_max_length, cfg.batch_size, "corpus"):
        scores = torch.cat([best[0], score(q, d, encoder.config.top_k)], dim=1)  # [Nq, kept + b]
        ids = torch.cat([best[1], torch.tensor(positions).expand(len(queries), -1)], dim=1)
        top = scores.topk(min(depth, scores.shape[1]), dim=1)
        best = top.values, ids.gather(1, top.indices)
    return best[1].tolist()


def bm25_search(queries: list[str], corpus: list[str], depth: int) -> list[list[int]]:
    """Each query's top-`depth` corpus positions by BM25 (bm25s, English stop words), best first."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    ids, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                k=min(depth, len(corpus)), show_progress=False)
    return ids.tolist()


def mine(cfg: MiningConfig) -> int:
    """Write the negatives file; returns the number of queries written."""
    dead_letter = DeadLetter(f"{cfg.out}.dead_letter.jsonl")
    data = load_beir(cfg.data_dir, cfg.split, None, dead_letter)
    doc_ids = list(data.corpus)
    queries = [data.queries[g.query_id] for g in data.groups]
    corpus = [data.corpus[d] for d in doc_ids]
    if cfg.method == "bm25":
        ranked = bm25_search(queries, corpus, cfg.depth)
    else:
        from common.tokenizer import load_tokenizer

        rep = None if cfg.representation is None else RepresentationConfig(cfg.representation, cfg.normalize)
        encoder = Encoder.from_pretrained(cfg.model, rep)
        collator = Collator(load_tokenizer(cfg.model), cfg.query_max_length, cfg.passage_max_length)
        ranked = dense_search(encoder, collator, queries, corpus, min(cfg.depth, len(doc_ids)), cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.out, "w", encoding="utf-8") as out:
        for group, positions in zip(data.groups, ranked):
            positives = set(group.positives)
            negatives = [doc_ids[i] for i in positions if i >= 0 and doc_ids[i] not in positives][cfg.skip_top:]
            out.write(json.dumps({"query_id": group.query_id, "negatives": negatives}) + "\n")
    logger.info("wrote hard negatives of %d queries to %s (%d malformed records skipped)", len(data.groups),
                cfg.out, dead_letter.count)
    return len(data.groups)


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from common.logging_setup import setup_logging

    setup_logging()
    (cfg,) = HfArgumentParser(MiningConfig).parse_args_into_dataclasses(argv)
    mine(cfg)


if __name__ == "__main__":
    sys.exit(main())
