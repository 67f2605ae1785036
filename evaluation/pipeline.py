"""The evaluation run: load the model once, then per dataset encode (cached, sharded), search, score, write.

Sharded runs: a `--shard_index i` task encodes corpus shard i into the cache and, with `--sparse_index seismic`
(or auto at that corpus size), builds the shard's Seismic index there too and searches the shard, caching its
top hits. The merging run reads each shard memory-mapped, takes a shard's cached hits where a task left them
(searching the shard otherwise) and merges the top-k, so the corpus is never concatenated in memory.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
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
from evaluation.search import HITS_FORMAT, SearchOptions, merge_top, ranking_from_hits, search_shard
from evaluation.sparse_index import SeismicIndex, index_record, load_or_build

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
        stale = False
        if cache_dir is not None and (hit := cache.load(cache_dir, name)) is not None:
            if hit.ids == ids:
                return hit
            stale = True  # same files by size and time, other content (e.g. reordered lines)
            logger.warning("cache entry %s has other ids; encoding again and replacing it", name)
        encoded = encode_texts(self.encoder, self.tokenizer, ids, texts, documents=documents,
                               max_length=self.max_length, max_tokens=self.cfg.max_tokens,
                               batch_size=self.cfg.batch_size, bf16=self.precision.enabled, desc=desc)
        if cache_dir is not None:
            cache.save(cache_dir, name, encoded, key, replace=stale)
        return encoded

    def encode_corpus_shards(self, data: BeirData) -> list[Encoded]:
        """The corpus shards this run handles (all, or --shard_index's), memory-mapped when read from the cache."""
        n, num = len(data.doc_ids), self.cfg.num_shards
        wanted = range(num) if self.cfg.shard_index is None else [self.cfg.shard_index]
        parts = []
        for shard in wanted:
            lo, hi = shard * n // num, (shard + 1) * n // num
            key = {"data": cache.fingerprint(data.folder / "corpus.jsonl"), "shard": [shard, num]}
            parts.append(self.encode(data.doc_ids[lo:hi], data.doc_texts[lo:hi], True, key,
                                     f"{data.name} corpus {shard + 1}/{num}"))
        return parts

    def encode_corpus(self, data: BeirData) -> Encoded | None:
        """The whole corpus merged from its shards (None when this run encodes only --shard_index)."""
        parts = self.encode_corpus_shards(data)
        return Encoded.concat(parts) if self.cfg.shard_index is None else None

    def sparse_index(self, shard: Encoded, options: SearchOptions) -> SeismicIndex:
        """The shard's Seismic index: from the cache when one was built for this shard, model, k and options."""
        if shard.source is None:
            return SeismicIndex.build(shard.sparse_indices, shard.sparse_values, options.seismic)
        folder = Path(shard.source)
        record = index_record(shard.digest, self.settings["model"], shard.sparse_indices.shape[1], len(shard.ids),
                              options.seismic)
        return load_or_build(folder.with_name(folder.name + ".seismic"), record, shard.sparse_indices,
                             shard.sparse_values, options.seismic)

    def search(self, queries: Encoded, shards: list[Encoded], total: int) -> tuple[np.ndarray, np.ndarray, list]:
        """(scores, rows, ids) of the top depth + 1 over all shards; each shard's hits cached per query set.

        Hits are keyed on the two cache entries' content digests, not their folders (an entry replaced in place
        keeps its folder), and reused only when the ids they were searched for are the ones searched now."""
        cfg, options = self.cfg, self.cfg.search_options()
        dupmae = queries.vocab is not None
        method = options.method(total) if dupmae else "dense"
        weight = self.encoder.config.sparse_weight
        parts, offsets, ids = [], [], []
        queries_cached = cfg.cache_path is not None and queries.digest is not None
        query_ids = cache.content_digest(queries.ids, {}) if queries_cached else None  # hashed once, not per shard
        for shard in shards:
            key = cache.cache_key(hits=HITS_FORMAT, shard=shard.digest, queries=queries.digest, method=method,
                                  depth=cfg.depth, options=options, index_factory=cfg.index_factory, weight=weight)
            cached = queries_cached and shard.digest is not None
            hit = searched_for = None
            if cached:  # a shard's ids are hashed only where its hits are cached (read or written)
                searched_for = {"shard_ids": cache.content_digest(shard.ids, {}), "query_ids": query_ids}
                hit = _cached_hits(cfg.cache_path / f"{key}.hits", searched_for)
            if hit is None:
                logger.info("searching shard %s (%d documents, %s)", shard.source, len(shard.ids), method)
                scores, rows = search_shard(queries, shard, cfg.depth + 1, cfg.index_factory, weight, method,
                                            lambda: self.sparse_index(shard, options), options)
                if cached:
                    cache.save_arrays(cfg.cache_path, f"{key}.hits", {"scores": scores, "rows": rows},
                                      {"shard": shard.source, "queries": queries.source, "method": method},
                                      {"searched_for": searched_for}, replace=True)
                hit = {"scores": scores, "rows": rows}
            parts.append((np.asarray(hit["scores"]), np.asarray(hit["rows"])))
            offsets.append(len(ids))
            ids.extend(shard.ids)
        scores, rows = parts[0] if len(parts) == 1 else merge_top(parts, offsets, cfg.depth + 1)
        return scores, rows, ids

    def encode_queries(self, data: BeirData) -> Encoded:
        key = {"data": cache.fingerprint(data.folder / "queries.jsonl"), "split": self.cfg.split,
               "qrels": cache.fingerprint(data.folder / "qrels" / f"{self.cfg.split}.tsv")}
        return self.encode(data.query_ids, data.query_texts, False, key, f"{data.name} queries")


def _cached_hits(folder: Path, searched_for: dict) -> dict | None:
    """A shard's cached hits when they were searched for these ids (`searched_for`), else None (searched again)."""
    hit = cache.load_arrays(folder, ("scores", "rows"))
    if hit["rows"] is None:
        return None
    record = folder / "searched_for.json"
    if not record.is_file() or json.loads(record.read_text()) != searched_for:
        logger.warning("%s: refused, searched for other ids; searching again", folder)
        return None
    logger.info("search hits cache hit: %s", folder)
    return hit


def check_sparse(shard: Encoded, queries: Encoded, top_k: int) -> None:
    """A dupmae corpus shard must hold the documents' kept entries, as many per document as the queries' model
    keeps; otherwise one line naming the file (a cache entry from another representation, or a damaged one). An
    empty shard (more shards than documents) holds nothing to check, and the search skips it."""
    if queries.vocab is None or not shard.ids:
        return
    where = Path(shard.source or "the corpus")
    if shard.sparse_indices is None or shard.sparse_values is None:
        missing = "sparse_indices.npy" if shard.sparse_indices is None else "sparse_values.npy"
        raise DatasetError(f"{where / missing}: missing; the dupmae queries need the documents' sparse entries")
    k = shard.sparse_indices.shape[1] if shard.sparse_indices.ndim == 2 else None
    expected = min(top_k, queries.vocab.shape[1])
    if k != expected or shard.sparse_values.shape != shard.sparse_indices.shape:
        raise DatasetError(f"{where / 'sparse_indices.npy'}: shape {tuple(shard.sparse_indices.shape)} (values "
                           f"{tuple(shard.sparse_values.shape)}); the query side expects [{len(shard.ids)}, {expected}]")


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
        shards = evaluator.encode_corpus_shards(data)
        queries = evaluator.encode_queries(data)
        for shard in shards:
            check_sparse(shard, queries, evaluator.encoder.config.top_k)
        scores, rows, ids = evaluator.search(queries, shards, len(data.doc_ids))
        if cfg.shard_index is not None:
            logger.info("%s: shard %d/%d encoded and searched into %s", data.name, cfg.shard_index, cfg.num_shards,
                        cfg.cache_path)
            continue
        ranking = ranking_from_hits(queries.ids, ids, scores, rows, cfg.depth)
        if cfg.fuse == "bm25":
            ranking = reciprocal_rank_fusion([ranking, bm25_run(data, cfg.depth, cfg.bm25)], cfg.rrf_k, cfg.depth)
        write_run(out / f"{data.name}.run", ranking, tag=run_tag)
        per_dataset[data.name] = evaluate(data.qrels, ranking)
        logger.info("%s: %s", data.name, {k: round(v, 4) for k, v in per_dataset[data.name].items()})
    if cfg.shard_index is not None:
        return None
    return write_results(out, per_dataset)
