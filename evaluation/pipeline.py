"""The evaluation run: load the model once, then per dataset encode (cached, sharded), search, score, write."""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from common.defaults import resolve_model
from common.precision import decide_bf16
from common.representation import Encoder
from common.tokenizer import load_tokenizer
from evaluation import cache
from evaluation.config import EvalConfig
from evaluation.data import BeirData, DatasetError, load_beir, resolve_dataset
from evaluation.encode import Encoded, encode_texts
from evaluation.fusion import bm25_run, reciprocal_rank_fusion
from evaluation.metrics import evaluate, write_results, write_run
from evaluation.search import search

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512


class Evaluator:
    """A loaded model plus the settings that identify its vectors in the cache."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        model_path = resolve_model(cfg.model_name_or_path)
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        self.precision = decide_bf16(cfg.bf16, device)
        self.precision.log(logger, "evaluation")
        self.encoder = Encoder.from_pretrained(model_path, cfg.representation_config())
        self.encoder.to(device).eval()
        self.tokenizer = load_tokenizer(model_path)
        self.max_length = cfg.max_length or self.encoder.max_seq_length or DEFAULT_MAX_LENGTH
        self.settings = {"model": cache.fingerprint(model_path), "representation": asdict(self.encoder.config),
                         "max_length": self.max_length, "bf16": self.precision.enabled}
        logger.info("model %s, representation %s, max_length %d, device %s", model_path, self.encoder.config,
                    self.max_length, device)

    def encode(self, ids: list[str], texts: list[str], documents: bool, key: dict, desc: str) -> Encoded:
        """Encode, or read the cache entry for these exact settings + key."""
        key = {**self.settings, **key, "documents": documents}
        name = cache.cache_key(**key)
        cache_dir = self.cfg.cache_path
        if cache_dir is not None and (hit := cache.load(cache_dir, name)) is not None:
            if hit.ids == ids:
                return hit
            logger.warning("cache entry %s has other ids; encoding again", name)
        encoded = encode_texts(self.encoder, self.tokenizer, ids, texts, documents=documents,
                               max_length=self.max_length, max_tokens=self.cfg.max_tokens,
                               batch_size=self.cfg.batch_size, bf16=self.precision.enabled, desc=desc)
        if cache_dir is not None:
            cache.save(cache_dir, name, encoded, key)
        return encoded

    def encode_corpus(self, data: BeirData) -> Encoded | None:
        """The whole corpus merged from its shards (None when this run encodes only --shard_index)."""
        n, num = len(data.doc_ids), self.cfg.num_shards
        wanted = range(num) if self.cfg.shard_index is None else [self.cfg.shard_index]
        parts = []
        for shard in wanted:
            lo, hi = shard * n // num, (shard + 1) * n // num
            key = {"data": cache.fingerprint(data.folder / "corpus.jsonl"), "shard": [shard, num]}
            parts.append(self.encode(data.doc_ids[lo:hi], data.doc_texts[lo:hi], True, key,
                                     f"{data.name} corpus {shard + 1}/{num}"))
        return Encoded.concat(parts) if self.cfg.shard_index is None else None

    def encode_queries(self, data: BeirData) -> Encoded:
        key = {"data": cache.fingerprint(data.folder / "queries.jsonl"), "split": self.cfg.split,
               "qrels": cache.fingerprint(data.folder / "qrels" / f"{self.cfg.split}.tsv")}
        return self.encode(data.query_ids, data.query_texts, False, key, f"{data.name} queries")


def run(cfg: EvalConfig) -> dict | None:
    """Evaluate every dataset; returns results.json's content (None for a --shard_index encoding run)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = [resolve_dataset(spec, cfg.data_dir, allow_download=not cfg.offline) for spec in cfg.datasets]
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise DatasetError(f"datasets {cfg.datasets} have repeated folder names {names}; results are keyed by name")
    evaluator = Evaluator(cfg)
    run_tag = "_".join(Path(resolve_model(cfg.model_name_or_path)).name.split()) or "model"
    if cfg.fuse != "none":
        run_tag += f"+{cfg.fuse}-rrf{cfg.rrf_k}" + ("" if cfg.bm25 == "standard" else f"-{cfg.bm25}")
    per_dataset = {}
    for folder in folders:
        data = load_beir(folder, cfg.split)
        corpus = evaluator.encode_corpus(data)
        if corpus is None:
            logger.info("%s: shard %d/%d encoded into %s", data.name, cfg.shard_index, cfg.num_shards, cfg.cache_path)
            continue
        queries = evaluator.encode_queries(data)
        ranking = search(queries, corpus, cfg.depth, cfg.index_factory, evaluator.encoder.config.sparse_weight)
        if cfg.fuse == "bm25":
            ranking = reciprocal_rank_fusion([ranking, bm25_run(data, cfg.depth, cfg.bm25)], cfg.rrf_k, cfg.depth)
        write_run(out / f"{data.name}.run", ranking, tag=run_tag)
        per_dataset[data.name] = evaluate(data.qrels, ranking)
        logger.info("%s: %s", data.name, {k: round(v, 4) for k, v in per_dataset[data.name].items()})
    if cfg.shard_index is not None:
        return None
    return write_results(out, per_dataset)
