"""Several representations of one encoder network scored on one BEIR dataset, with one encoder pass per batch.

Used where the question is "which representation, and how good, right now": the pre-training retrieval probe
(`pretrain.retrieval_probe`) and the adaptation experiment (`benchmarks/adaptation.py`). Encoding, exact search
and pytrec_eval metrics are evaluation's own, so the numbers equal `python -m evaluation.beir` on the same data
and truncation.
"""
from __future__ import annotations

from common.representation import Encoder
from evaluation.data import BeirData
from evaluation.encode import encode_texts_many
from evaluation.metrics import evaluate
from evaluation.search import search

#: Token budget per encoder batch (rows x longest row), as evaluation's default.
MAX_TOKENS = 8192


def score_representations(encoders: dict[str, Encoder], tokenizer, data: BeirData, *, max_length: int,
                          query_max_length: int, depth: int = 100) -> dict[str, dict[str, float]]:
    """{name: evaluation's metrics} for encoders that share one network (`Encoder.with_config`)."""
    runs = rank_representations(encoders, tokenizer, data, max_length=max_length, query_max_length=query_max_length,
                                depth=depth)
    return {name: evaluate(data.qrels, run) for name, run in runs.items()}


def rank_representations(encoders: dict[str, Encoder], tokenizer, data: BeirData, *, max_length: int,
                         query_max_length: int, depth: int = 100) -> dict[str, dict[str, dict[str, float]]]:
    """{name: run ({query id: {doc id: score}}, the top `depth`)} for encoders that share one network."""
    options = {"max_tokens": MAX_TOKENS, "batch_size": 128}
    named = list(encoders.items())
    docs = encode_texts_many([e for _, e in named], tokenizer, data.doc_ids, data.doc_texts, documents=True,
                             max_length=max_length, desc=f"{data.name} corpus", **options)
    queries = encode_texts_many([e for _, e in named], tokenizer, data.query_ids, data.query_texts,
                                documents=False, max_length=query_max_length, desc=f"{data.name} queries", **options)
    return {name: search(q, d, depth, sparse_weight=encoder.config.sparse_weight)
            for (name, encoder), d, q in zip(named, docs, queries)}
