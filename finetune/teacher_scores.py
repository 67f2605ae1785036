"""Teacher scores for distillation: a "qid did score" line (the official format) for every pair of the fine-tuning
set, each training query's positives and its mined hard negatives, by one of four scorers.

    python -m finetune.teacher_scores --scorer cross-encoder --model cross-encoder/ms-marco-MiniLM-L6-v2 \
        --data_dir D --negatives negs.jsonl --out scores.txt          # any sentence-transformers CrossEncoder
    python -m finetune.teacher_scores --scorer bi-encoder --model M --data_dir D --negatives negs.jsonl --out s.txt
    python -m finetune.teacher_scores --scorer bm25 --data_dir D --negatives negs.jsonl --out s.txt
    python -m finetune.teacher_scores --scorer fusion --model M --data_dir D --negatives negs.jsonl --out s.txt
    # sharded: N processes, each its own queries (by stride); the last to finish merges the shards into --out
    torchrun --nproc_per_node N -m finetune.teacher_scores ...   (or --num_shards N --shard_index i)

Scores, by scorer:
- cross-encoder: the model's logit for (query, passage) (no sigmoid), passage = title + " " + text; a model with
  more than one label needs --label, the one that means relevant (an index or an id2label name).
- bi-encoder: the model's own retrieval score (`common.representation.score`: cls, mean or dupmae, as fine-tuning
  and evaluation compute it), query and passage cut at --query_max_length / --passage_max_length.
- bm25: `common.bm25` (Anserini's BEIR baseline unless --bm25 says otherwise).
- fusion: the bi-encoder's ranking of the whole corpus fused with BM25's by reciprocal rank (`common.fusion`, the
  code of `evaluation --fuse bm25`), each run cut at --depth. The RRF sum Σ 1/(k + rank) lies in (0, 2/(k+1)];
  as a logit it is written times (k + 1) / 2, so 1.0 is "first in both runs" and a document outside both runs
  scores 0: a cosine-like scale, for the student's temperature (e.g. --teacher_temperature 0.05 beside a cosine
  student's 0.05). The order, the only thing RRF defines, is unchanged.
A finished output (or shard) is kept: a rerun with the same --out does nothing (--overwrite redoes it).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from common.bm25 import PRESET_HELP
from common.flags import optional_bool
from common.precision import bf16_field, decide_bf16, parse_bf16
from finetune.config import arg
from finetune.data import FinetuneData, TrainGroup
from finetune.teacher import TeacherScores, read_teacher_scores, write_teacher_scores

logger = logging.getLogger(__name__)

SCORERS = ("cross-encoder", "bi-encoder", "bm25", "fusion")


@dataclass
class TeacherScoresConfig:
    scorer: Literal["cross-encoder", "bi-encoder", "bm25", "fusion"] = arg("fusion", "what scores the pairs")
    model: str = arg("default", "CrossEncoder (hub name or folder), or the bi-encoder of bi-encoder/fusion "
                                "('default' = packaged MiniLM); unused by bm25")
    data_dir: str = arg("", "BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    negatives: str | None = arg(None, "the mining output (JSONL {query_id, negatives}) whose pairs get scores")
    out: str = arg("", "output: 'qid did score' lines")
    split: str = arg("train", "qrels split whose queries are scored")
    representation: Literal["cls", "mean", "dupmae"] | None = arg(None, "bi-encoder: override the folder's own")
    normalize: bool | None = optional_bool("bi-encoder: L2-normalize the dense part; None: the model's")
    query_max_length: int = arg(32, "bi-encoder: query tokens, [CLS]/[SEP] included")
    passage_max_length: int = arg(144, "bi-encoder: passage tokens; cross-encoder: pair tokens")
    label: str | None = arg(None, "cross-encoder: the label whose logit is the score, by index or id2label name "
                                  "(e.g. 1 or 'relevant'); required when the model has more than one label")
    bm25: Literal["standard", "bm25s-defaults"] = arg("standard", PRESET_HELP)
    rrf_k: int = arg(60, "fusion: the RRF constant k in 1 / (k + rank)")
    depth: int = arg(1000, "fusion: each run's documents per query (a document outside both adds nothing)")
    batch_size: int = arg(64, "texts (or pairs) per forward pass")
    bf16: str = bf16_field("bf16 autocast for the model: auto (where the device has native bf16), true, false")
    num_shards: int = arg(int(os.environ.get("WORLD_SIZE", 1)), "processes sharing the queries (default: "
                                                                 "WORLD_SIZE)")
    shard_index: int = arg(int(os.environ.get("RANK", 0)), "this process's shard (default: RANK)")
    overwrite: bool = arg(False, "score again although the output (or this shard) exists")

    def __post_init__(self) -> None:
        if not self.data_dir or not self.out:
            raise ValueError("--data_dir and --out are required")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"need 0 <= --shard_index < --num_shards, got {self.shard_index} of {self.num_shards}")
        if min(self.batch_size, self.depth, self.query_max_length, self.passage_max_length) < 1 or self.rrf_k < 0:
            raise ValueError("need --batch_size, --depth, the max lengths >= 1 and --rrf_k >= 0")
        self.bf16 = parse_bf16(self.bf16)


def pairs_of(groups: list[TrainGroup]) -> dict[str, list[str]]:
    """query id -> its positives, then its hard negatives (the documents fine-tuning draws for it)."""
    return {g.query_id: g.positives + g.negatives for g in groups}


def _autocast(cfg: TeacherScoresConfig, device: torch.device):
    choice = decide_bf16(cfg.bf16, device)
    choice.log(logger, "teacher scores")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=choice.enabled)


def cross_encoder_scores(cfg: TeacherScoresConfig, data: FinetuneData, pairs: dict[str, list[str]]) -> TeacherScores:
    from sentence_transformers import CrossEncoder

    from common.defaults import resolve_model

    model = CrossEncoder(resolve_model(cfg.model), max_length=cfg.passage_max_length)
    column = relevant_column(model.config, cfg.label, cfg.model)
    flat = [(qid, did) for qid, docs in pairs.items() for did in docs]
    with _autocast(cfg, model.device):
        logits = model.predict([(data.queries[q], data.corpus[d]) for q, d in flat], batch_size=cfg.batch_size,
                               show_progress_bar=True, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    scores: TeacherScores = {}
    values = np.asarray(logits, dtype=np.float32).reshape(len(flat), -1)[:, column]
    for (qid, did), value in zip(flat, values.tolist()):
        scores.setdefault(qid, {})[did] = value
    return scores


def relevant_column(config, label: str | None, model: str) -> int:
    """The logit column that scores relevance: the only one of a 1-label model, else --label's (an index or an
    id2label name). A 2-label reranker's column 0 usually means "not relevant", so it is never taken silently."""
    names = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
    count = config.num_labels
    if label is None:
        if count != 1:
            raise ValueError(f"{model}: the cross-encoder has {count} labels ({names}); pass --label with the one "
                             "that means relevant (an index or a name)")
        column = 0
    elif label.lstrip("-").isdigit() and 0 <= int(label) < count:
        column = int(label)
    elif label in names.values():
        column = next(i for i, name in names.items() if name == label)
    else:
        raise ValueError(f"{model}: label {label!r} is neither an index below {count} nor one of {names}")
    logger.info("cross-encoder teacher: the logit of label %d (%r) of %d", column, names.get(column), count)
    return column


def _encode(encoder, collator, texts: list[str], max_length: int, batch_size: int, autocast, documents: bool,
            desc: str):
    """(dense [N, D] fp32, vocab: None, queries' [N, V] dense or documents' top-k [N, V] sparse COO), in input
    order; texts are batched by length so padding costs little."""
    from common.representation import sparsify

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    dense, vocab = [None] * len(texts), []
    rows = []
    top_k = encoder.config.top_k if documents else None
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=5):
        ids = order[start:start + batch_size]
        with torch.inference_mode(), autocast:
            rep = encoder(**collator.encode([texts[i] for i in ids], max_length))
        for row, i in enumerate(ids):
            dense[i] = rep.dense[row].float()
        if rep.vocab is not None:
            values = rep.vocab.float()
            if top_k is not None:
                indices, kept = sparsify(values, top_k)
                values = torch.zeros_like(values).scatter(-1, indices, kept).to_sparse()
            vocab.append(values)
            rows.extend(ids)
    dense = torch.stack(dense)
    if not vocab:
        return dense, None
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(rows)] = torch.arange(len(rows))
    stacked = torch.cat(vocab)
    if stacked.is_sparse:  # rows back to input order
        return dense, stacked.index_select(0, inverse).coalesce()
    return dense, stacked[inverse]


def score_matrix(queries, docs, sparse_weight: float) -> torch.Tensor:
    """[Q, N] scores of every query against every document: dense dot (+ weight x query vocab at the documents'
    kept entries), the sum `common.representation.score` computes in training."""
    q_dense, q_vocab = queries
    d_dense, d_vocab = docs
    scores = q_dense @ d_dense.T
    if d_vocab is not None:
        scores += sparse_weight * torch.sparse.mm(d_vocab, q_vocab.T).T
    return scores


def bi_encoder_matrix(cfg: TeacherScoresConfig, query_texts: list[str], doc_texts: list[str]) -> torch.Tensor:
    """[Q, N] the bi-encoder's scores (queries x documents), encoded under --bf16."""
    from common.representation import Encoder, resolve_config
    from common.tokenizer import load_tokenizer
    from finetune.data import Collator

    rep = resolve_config(cfg.model, kind=cfg.representation, normalize=cfg.normalize)
    encoder, tokenizer = Encoder.from_pretrained(cfg.model, rep).eval(), load_tokenizer(cfg.model)
    collator = Collator(tokenizer, cfg.query_max_length, cfg.passage_max_length)
    autocast = _autocast(cfg, next(encoder.parameters()).device)
    queries = _encode(encoder, collator, query_texts, cfg.query_max_length, cfg.batch_size, autocast, False, "queries")
    docs = _encode(encoder, collator, doc_texts, cfg.passage_max_length, cfg.batch_size, autocast, True, "passages")
    return score_matrix(queries, docs, encoder.config.sparse_weight)


def bi_encoder_scores(cfg: TeacherScoresConfig, data: FinetuneData, pairs: dict[str, list[str]]) -> TeacherScores:
    doc_ids = sorted({d for docs in pairs.values() for d in docs})
    column = {d: i for i, d in enumerate(doc_ids)}
    matrix = bi_encoder_matrix(cfg, [data.queries[q] for q in pairs], [data.corpus[d] for d in doc_ids])
    return {qid: {d: float(matrix[row, column[d]]) for d in docs} for row, (qid, docs) in enumerate(pairs.items())}


def bm25_scores(cfg: TeacherScoresConfig, data: FinetuneData, pairs: dict[str, list[str]]) -> TeacherScores:
    from common.bm25 import BM25, preset

    doc_ids = list(data.corpus)
    column = {d: i for i, d in enumerate(doc_ids)}
    index = BM25([data.corpus[d] for d in doc_ids], preset(cfg.bm25))
    scores = {}
    for qid, docs in tqdm(pairs.items(), desc="bm25", unit="query", mininterval=5):
        row = index.scores(data.queries[qid])
        scores[qid] = {d: float(row[column[d]]) for d in docs}
    return scores


def fusion_scores(cfg: TeacherScoresConfig, data: FinetuneData, pairs: dict[str, list[str]]) -> TeacherScores:
    """RRF of the bi-encoder's and BM25's rankings of the whole corpus, times (k + 1) / 2 (module docstring)."""
    from common.bm25 import BM25, preset
    from common.fusion import reciprocal_rank_fusion

    doc_ids, qids = list(data.corpus), list(pairs)
    texts = [data.corpus[d] for d in doc_ids]
    depth = min(cfg.depth, len(doc_ids))
    dense = bi_encoder_matrix(cfg, [data.queries[q] for q in qids], texts)
    top_scores, top_rows = torch.topk(dense, depth, dim=1)
    dense_run = {qid: {doc_ids[r]: s for s, r in zip(scores, rows)}
                 for qid, scores, rows in zip(qids, top_scores.tolist(), top_rows.tolist())}
    hits = BM25(texts, preset(cfg.bm25)).search([data.queries[q] for q in qids], depth)
    bm25_run = {qid: {doc_ids[r]: float(depth - rank) for rank, r in enumerate(rows)} for qid, rows in zip(qids, hits)}
    fused = reciprocal_rank_fusion([dense_run, bm25_run], cfg.rrf_k)
    scale = (cfg.rrf_k + 1) / 2
    return {qid: {d: fused[qid].get(d, 0.0) * scale for d in docs} for qid, docs in pairs.items()}


SCORE = {"cross-encoder": cross_encoder_scores, "bi-encoder": bi_encoder_scores, "bm25": bm25_scores,
         "fusion": fusion_scores}


def shard_path(cfg: TeacherScoresConfig, index: int) -> Path:
    out = Path(cfg.out)
    return out if cfg.num_shards == 1 else out.with_name(f"{out.name}.shard-{index}-of-{cfg.num_shards}")


def teacher_scores(cfg: TeacherScoresConfig) -> Path:
    """Write this shard's scores (skipped when present, unless --overwrite); merge every shard into --out once all
    are there. Returns the file written or found."""
    from finetune.data import DeadLetter, load_beir

    out, mine = Path(cfg.out), shard_path(cfg, cfg.shard_index)
    if (out.is_file() or mine.is_file()) and not cfg.overwrite:
        logger.info("%s exists: kept (--overwrite scores again)", out if out.is_file() else mine)
    else:
        data = load_beir(cfg.data_dir, cfg.split, cfg.negatives, DeadLetter(f"{cfg.out}.dead_letter.jsonl"))
        pairs = pairs_of(data.groups[cfg.shard_index::cfg.num_shards])
        logger.info("scoring %d pairs of %d queries with %s %s (shard %d of %d)", sum(map(len, pairs.values())),
                    len(pairs), cfg.scorer, "" if cfg.scorer == "bm25" else cfg.model, cfg.shard_index, cfg.num_shards)
        write_teacher_scores(mine, SCORE[cfg.scorer](cfg, data, pairs))
    shards = [shard_path(cfg, i) for i in range(cfg.num_shards)]
    if cfg.num_shards > 1 and all(p.is_file() for p in shards) and (cfg.overwrite or not out.is_file()):
        merged: TeacherScores = {}
        for shard in shards:
            merged.update(read_teacher_scores(shard))
        write_teacher_scores(out, merged)
    logger.info("teacher scores: %s", out if out.is_file() else mine)
    return out if out.is_file() else mine


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from common.logging_setup import setup_logging

    setup_logging()
    (cfg,) = HfArgumentParser(TeacherScoresConfig).parse_args_into_dataclasses(argv)
    teacher_scores(cfg)


if __name__ == "__main__":
    sys.exit(main())
