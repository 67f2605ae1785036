"""Options of `python -m evaluation.beir`, one dataclass parsed by HfArgumentParser (HF flag names where they exist)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from common.flags import optional_bool
from common.precision import bf16_field, parse_bf16
from common.representation import KINDS, RepresentationConfig, resolve_config
from common.bm25 import PRESET_HELP, PRESETS
from evaluation.fusion import FUSIONS
from evaluation.search import EXACT_BELOW, SPARSE_INDEXES, SearchOptions


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class EvalConfig:
    datasets: list[str] = field(metadata=_help("BEIR folders or bare BEIR names (looked up in --data_dir)"))
    output_dir: str = field(metadata=_help("where results.json, results.md, the run files and the cache go"))
    model_name_or_path: str | None = field(
        default=None, metadata=_help("HF / sentence-transformers / DupMAE folder; None: packaged MiniLM",
                                     aliases=["--model"]))
    representation: str | None = field(
        default=None, metadata=_help("cls, mean or dupmae; None: the model's saved config", choices=list(KINDS)))
    normalize: bool | None = optional_bool("L2-normalize the dense part; None: the model's")
    dense_dim: int | None = field(default=None, metadata=_help("dupmae projection dim; None: the model's / 384"))
    sparse_top_k: int | None = field(default=None, metadata=_help("dupmae document top-k; None: the model's / 384"))
    sparse_weight: float | None = field(
        default=None, metadata=_help("dupmae: weight of the sparse score beside the dense one; None: the model's"))
    split: str = field(default="test", metadata=_help("qrels split (qrels/SPLIT.tsv); MS MARCO: dev"))
    batch_size: int = field(default=128, metadata=_help("most texts per batch", aliases=["--per_device_eval_batch_size"]))
    max_tokens: int = field(default=8192, metadata=_help("token budget per batch (rows x longest row)"))
    max_length: int | None = field(
        default=None, metadata=_help("truncation length; None: the model's max_seq_length, else 512",
                                     aliases=["--max_seq_length"]))
    depth: int = field(default=1000, metadata=_help("documents retrieved per query"))
    index_factory: str | None = field(default=None, metadata=_help(
        "faiss index factory (e.g. HNSW32) for the dense search, or dupmae's dense candidates; None: exact (the "
        "candidates: a scan of bfloat16 copies of the dense halves)"))
    sparse_index: str = field(default="auto", metadata=_help(
        "dupmae search: exact, seismic (candidates of a Seismic index and faiss, rescored from float16 rows), or "
        f"auto (exact below {EXACT_BELOW} documents)", choices=list(SPARSE_INDEXES)))
    candidates: int = field(default=300, metadata=_help(
        "--sparse_index seismic: candidates per half rescored (at least --depth)"))
    dense_candidates: int | None = field(default=None, metadata=_help(
        "--sparse_index seismic: the dense half's candidates rescored, when not --candidates"))
    query_cut: int = field(default=32, metadata=_help("--sparse_index seismic: query entries the index reads"))
    heap_factor: float = field(default=0.9, metadata=_help("--sparse_index seismic: Seismic's heap factor (0, 1]"))
    faiss_params: str | None = field(default=None, metadata=_help(
        "faiss ParameterSpace settings of the --index_factory index, e.g. nprobe=16 (IVF) or efSearch=128 (HNSW)"))
    cache_dir: str | None = field(default=None, metadata=_help("embedding cache; None: OUTPUT_DIR/cache"))
    no_cache: bool = field(default=False, metadata=_help("neither read nor write the embedding cache"))
    shard_index: int | None = field(default=None, metadata=_help("encode only this corpus shard into the cache, then stop"))
    num_shards: int = field(default=1, metadata=_help("corpus shards; without --shard_index: merge (encode missing)"))
    data_dir: str = field(default=os.environ.get("BEIR_DATA_DIR", str(Path.home() / ".cache" / "dupmae" / "beir")),
                          metadata=_help("where bare BEIR names live and are downloaded to"))
    offline: bool = field(default=os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"),
                          metadata=_help("never download datasets (default: on when HF_HUB_OFFLINE is set)"))
    bf16: str = bf16_field("bf16 autocast for encoding: auto (where the device has native bf16; common.precision), "
                           "true, false")
    device: str = field(default="auto", metadata=_help("cpu, cuda, cuda:N; auto: cuda when available"))
    fuse: str = field(default="none", metadata=_help(
        "bm25: fuse the model's ranking with BM25's by reciprocal rank (evaluation.fusion)", choices=list(FUSIONS)))
    rrf_k: int = field(default=60, metadata=_help("--fuse: the RRF constant k in 1 / (k + rank)"))
    bm25: str = field(default="standard", metadata=_help("--fuse bm25: " + PRESET_HELP, choices=list(PRESETS)))

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("EvalConfig.datasets: give at least one dataset")
        self.bf16 = parse_bf16(self.bf16)
        for name in ("batch_size", "max_tokens", "depth", "num_shards"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"EvalConfig.max_length must be >= 2, got {self.max_length}")
        if self.shard_index is not None:
            if not 0 <= self.shard_index < self.num_shards:
                raise ValueError(f"EvalConfig.shard_index {self.shard_index} not in [0, {self.num_shards})")
            if self.no_cache:
                raise ValueError("EvalConfig: --shard_index writes its shard to the cache; it cannot go with --no_cache")
        for name in ("dense_dim", "sparse_top_k"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"EvalConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sparse_weight is not None and self.sparse_weight < 0:
            raise ValueError(f"EvalConfig.sparse_weight must be >= 0, got {self.sparse_weight}")
        if self.fuse not in FUSIONS:
            raise ValueError(f"EvalConfig.fuse must be one of {FUSIONS}, got {self.fuse!r}")
        if self.rrf_k < 0:
            raise ValueError(f"EvalConfig.rrf_k must be >= 0, got {self.rrf_k}")
        self.search_options()  # validates the search options

    def search_options(self) -> SearchOptions:
        return SearchOptions(self.sparse_index, self.candidates, self.dense_candidates, self.query_cut,
                             self.heap_factor, self.faiss_params)

    def representation_config(self) -> RepresentationConfig:
        """The model's saved representation with the options given here applied (`resolve_config`)."""
        return resolve_config(self.model_name_or_path, kind=self.representation, normalize=self.normalize,
                              dense_dim=self.dense_dim, top_k=self.sparse_top_k, sparse_weight=self.sparse_weight)

    @property
    def cache_path(self) -> Path | None:
        return None if self.no_cache else Path(self.cache_dir or Path(self.output_dir) / "cache")
