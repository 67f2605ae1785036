"""How an experiment scores a model on a BEIR test split: several representations from one encoder pass, BM25,
and the model fused with BM25 by reciprocal rank. Shared by the adaptation experiment and the ablation, so their
rows are computed the same way as `python -m evaluation.beir` on the same data and truncation."""
from __future__ import annotations

from pathlib import Path

from common.representation import RepresentationConfig

QUERY_MAX_LENGTH = 64
DEPTH = 100


def dupmae_representation(model: str) -> RepresentationConfig:
    """The `dupmae` representation a model gets: its folder's own, or the one `resolve_config` derives for it.
    An experiment computes it once per variant and scores both stages with it, so a fine-tuned folder (which
    records the fine-tuning's dense representation) is not scored with another dupmae than its zero-shot row."""
    from common.representation import resolve_config

    return resolve_config(model, kind="dupmae")


def evaluate_model(model: str, dataset: Path, max_length: int, max_docs: int,
                   dupmae: RepresentationConfig | None = None) -> dict[str, dict[str, float]]:
    """{representation: metrics}: mean and cls (cosine) and, when `dupmae` is given, that representation."""
    from common.representation import Encoder
    from common.tokenizer import load_tokenizer
    from evaluation.compare import score_representations

    encoder = Encoder.from_pretrained(model, dupmae)
    encoders = {"mean": encoder.with_config(RepresentationConfig(kind="mean", normalize=True)),
                "cls": encoder.with_config(RepresentationConfig(kind="cls", normalize=True))}
    if dupmae is not None:
        encoders["dupmae"] = encoder
    return score_representations(encoders, load_tokenizer(model), _test_split(dataset, max_docs),
                                 max_length=max_length, query_max_length=QUERY_MAX_LENGTH, depth=DEPTH)


def bm25_scores(dataset: Path, max_docs: int) -> dict[str, float]:
    """BM25 (`common.bm25`, Anserini's BEIR baseline) on the test split: the lexical reference row."""
    from evaluation.fusion import bm25_run
    from evaluation.metrics import evaluate

    data = _test_split(dataset, max_docs)
    return evaluate(data.qrels, bm25_run(data, DEPTH))


def fused_scores(model: str, dataset: Path, max_length: int, max_docs: int, rrf_k: int = 60) -> dict[str, float]:
    """The model's own representation (its folder's config) fused with BM25 by reciprocal rank (`evaluation.fusion`):
    the training-free baseline that pre-training must beat."""
    from common.representation import Encoder
    from common.tokenizer import load_tokenizer
    from evaluation.compare import rank_representations
    from evaluation.fusion import bm25_run, reciprocal_rank_fusion
    from evaluation.metrics import evaluate

    data = _test_split(dataset, max_docs)
    dense = rank_representations({"own": Encoder.from_pretrained(model)}, load_tokenizer(model), data,
                                 max_length=max_length, query_max_length=QUERY_MAX_LENGTH, depth=DEPTH)["own"]
    return evaluate(data.qrels, reciprocal_rank_fusion([dense, bm25_run(data, DEPTH)], rrf_k, DEPTH))


def _test_split(dataset: Path, max_docs: int):
    from evaluation.data import load_beir, subsample

    return subsample(load_beir(dataset, "test"), 0, max_docs)
