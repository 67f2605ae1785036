"""Top-k search over encoded corpora: faiss inner product (dense); dupmae dense + sparse, exact or indexed.

The dupmae score is <q,d> = q_dense·d_dense + w_s Σ_{i ∈ kept(d)} q_vocab[i] d_vocab[i].
- exact (`dupmae_search`): the corpus's kept entries form a CSR matrix D [N, V], so one query batch costs a dense
  matmul plus D @ q_vocabᵀ (N·k per query), linear in the corpus.
- indexed (`indexed_dupmae_search`, `--sparse_index seismic`): the top M candidates of each half, the sparse ones
  from a Seismic index (`evaluation.sparse_index`) read with the query's `query_cut` largest entries, the dense
  ones (`dense_candidates` of them, default M) from faiss (`--index_factory`) or, without one, from a scan of a
  bfloat16 copy of the dense halves; their union is rescored by the formula above (the query's whole vocabulary
  vector at the document's kept entries) from a compact in-memory copy of the rows (`RowStore`, float16). Cost per
  query: the two lookups (the scan: N·D) plus the union's size x k for the rescoring, instead of N·k.
A corpus may come as shards (the embedding cache's memory-mapped entries): each is searched on its own and the
top-k are merged, so the corpus is never concatenated in memory. Searches fetch one extra hit so a document with
the query's own id can be dropped (BEIR's convention).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from evaluation.cache import drop_pages
from evaluation.encode import Encoded
from evaluation.sparse_index import SeismicConfig, SeismicIndex

logger = logging.getLogger(__name__)

QUERY_BATCH = 256  # queries scored at once
SCAN_ROWS = 1 << 19  # corpus rows scored at once by the dense scan (its bfloat16 [b, rows] block: 256 MiB)
DOC_CHUNK = 1 << 20  # corpus rows scored at once in the exact sparse search (bounds the [Q, N] score block)
SPARSE_INDEXES = ("auto", "exact", "seismic")
#: Part of the search-hits cache's key: raised when a search's hits change for the same inputs, so that hits cached
#: before are not reused (2: Seismic's hits filed by their query id, not by position; 3: without --index_factory,
#: the dense candidates of --sparse_index seismic come from a bfloat16 scan, not faiss's IndexFlatIP).
HITS_FORMAT = 3
#: --sparse_index auto searches exactly below this many corpus documents (all shards), with Seismic from it on.
EXACT_BELOW = 100_000


@dataclass(frozen=True)
class SearchOptions:
    """How a dupmae corpus is searched (`--sparse_index`, `--candidates`, `--query_cut`, `--heap_factor`)."""

    sparse_index: str = "exact"  # exact, seismic, or auto (exact below EXACT_BELOW documents)
    candidates: int = 300  # indexed: candidates per half (sparse index, faiss) rescored (at least depth)
    dense_candidates: int | None = None  # indexed: the dense half's candidates, when not `candidates`
    query_cut: int = 32  # indexed: the query's largest vocabulary entries the sparse index reads
    heap_factor: float = 0.9  # indexed: Seismic skips a block whose summary score is below this x the M-th best
    faiss_params: str | None = None  # faiss ParameterSpace settings for the dense index, e.g. "nprobe=16"
    seismic: SeismicConfig = field(default_factory=SeismicConfig)

    def __post_init__(self) -> None:
        if self.sparse_index not in SPARSE_INDEXES:
            raise ValueError(f"SearchOptions.sparse_index must be one of {SPARSE_INDEXES}, got {self.sparse_index!r}")
        if min(self.candidates, self.query_cut, 1 if self.dense_candidates is None else self.dense_candidates) <= 0:
            raise ValueError(f"SearchOptions: candidates, dense_candidates and query_cut must be positive, got {self}")
        if not 0 < self.heap_factor <= 1:
            raise ValueError(f"SearchOptions.heap_factor must be in (0, 1], got {self.heap_factor}")

    def method(self, corpus_size: int) -> str:
        if self.sparse_index == "auto":
            return "exact" if corpus_size < EXACT_BELOW else "seismic"
        return self.sparse_index


ADD_ROWS = 1 << 16  # rows added to faiss at once
TRAIN_ROWS = 100_000  # at most this many rows (evenly spaced) train a faiss index that needs training


def faiss_index(dense: np.ndarray, index_factory: str | None = None, params: str | None = None):
    """A faiss inner-product index over the rows of `dense` (IndexFlatIP unless a factory is given), added in
    chunks; `params`: faiss ParameterSpace settings (e.g. "nprobe=16")."""
    import faiss

    n, dim = dense.shape
    if index_factory:
        index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(np.ascontiguousarray(dense[::max(1, n // TRAIN_ROWS)], dtype=np.float32))
    else:
        index = faiss.IndexFlatIP(dim)
    for start in range(0, n, ADD_ROWS):
        index.add(np.ascontiguousarray(dense[start:start + ADD_ROWS], dtype=np.float32))
        drop_pages(dense)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    return index


def dense_search(queries: Encoded, corpus: Encoded, depth: int, index_factory: str | None = None,
                 params: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, corpus rows), both [Q, depth'], best first, with faiss (IndexFlatIP unless a factory is given)."""
    index = faiss_index(corpus.dense, index_factory, params)
    return index.search(np.ascontiguousarray(queries.dense), min(depth, len(corpus.ids)))


def _corpus_csr(corpus: Encoded, start: int, stop: int, vocab_size: int):
    """Rows start:stop of the documents' kept entries as a scipy CSR matrix [rows, V]."""
    from scipy.sparse import csr_matrix

    idx = corpus.sparse_indices[start:stop]  # [n, k]
    val = corpus.sparse_values[start:stop]  # [n, k]
    n, k = idx.shape
    return csr_matrix((val.reshape(-1), idx.reshape(-1), np.arange(0, n * k + 1, k)), shape=(n, vocab_size))


def _check_dupmae(queries: Encoded, corpus: Encoded) -> None:
    if queries.vocab is None or corpus.sparse_indices is None:
        raise ValueError("dupmae search needs query vocab vectors and document sparse entries")


def dupmae_search(queries: Encoded, corpus: Encoded, depth: int, sparse_weight: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-depth by dense dot + sparse_weight x sparse (document top-k) score; (scores, corpus rows)
    [Q, depth'] best first."""
    _check_dupmae(queries, corpus)
    depth = min(depth, len(corpus.ids))
    vocab_size = queries.vocab.shape[1]
    all_scores, all_rows = [], []
    chunks = [(s, min(s + DOC_CHUNK, len(corpus.ids))) for s in range(0, len(corpus.ids), DOC_CHUNK)]
    csr = [_corpus_csr(corpus, s, e, vocab_size) for s, e in chunks]
    doc_dense = torch.from_numpy(np.asarray(corpus.dense, dtype=np.float32).copy())
    for qs in tqdm(range(0, len(queries.ids), QUERY_BATCH), desc="dupmae search", unit="batch", mininterval=5):
        q_dense = torch.from_numpy(np.array(queries.dense[qs:qs + QUERY_BATCH]))  # [b, D]
        q_vocab_t = np.ascontiguousarray(queries.vocab[qs:qs + QUERY_BATCH].T)  # [V, b]
        best_scores = best_rows = None
        for (start, stop), docs in zip(chunks, csr):
            block = q_dense @ doc_dense[start:stop].T + sparse_weight * torch.from_numpy(docs @ q_vocab_t).T  # [b, n]
            scores, rows = torch.topk(block, min(depth, stop - start), dim=1)
            rows += start
            if best_scores is not None:  # merge with the best of earlier chunks
                scores, pick = torch.topk(torch.cat([best_scores, scores], 1), depth, dim=1)
                rows = torch.gather(torch.cat([best_rows, rows], 1), 1, pick)
            best_scores, best_rows = scores, rows
        all_scores.append(best_scores.numpy())
        all_rows.append(best_rows.numpy())
    return np.concatenate(all_scores), np.concatenate(all_rows)


class RowStore:
    """The corpus rows the rescoring reads, held in memory compactly: the dense vectors and the kept entries' values
    as float16, their vocabulary ids as uint16 (int32 above 65,536 ids). Copied once from the (memory-mapped)
    corpus, chunk by chunk with its pages dropped, so the rescoring neither maps the corpus file nor counts its
    page-cache pages as its own: 2 (D + 2k) bytes a document (2.3 KB at D = k = 384), and 2 D more with `scan`
    (the bfloat16 copy `dense_top` reads). float16 moves a score by about 1e-3 of its size at most (unit-norm dense
    halves; float32 sums)."""

    def __init__(self, corpus: Encoded, vocab_size: int, scan: bool = False):
        n, k = corpus.sparse_indices.shape
        self.dense = np.empty((n, corpus.dense.shape[1]), np.float16)
        self.ids = np.empty((n, k), np.uint16 if vocab_size <= 1 << 16 else np.int32)
        self.values = np.empty((n, k), np.float16)
        for start in range(0, n, ADD_ROWS):
            stop = min(start + ADD_ROWS, n)
            self.dense[start:stop] = corpus.dense[start:stop]
            self.ids[start:stop] = corpus.sparse_indices[start:stop]
            self.values[start:stop] = corpus.sparse_values[start:stop]
            drop_pages(corpus.dense, corpus.sparse_indices, corpus.sparse_values)
        self.scan = torch.from_numpy(self.dense).bfloat16() if scan else None  # [N, D]: dense_top's rows

    def dense_top(self, q_dense: np.ndarray, m: int) -> np.ndarray:
        """Rows [b, m] of each query's top m by the dense half, in no order: the dense candidates when no faiss
        index is given (a store made with `scan`). A scan of the bfloat16 copy of the dense halves a chunk at a
        time with a running top m (benchmarks/dense_scan.py times it against faiss's IndexFlatIP, which held a
        float32 copy and gave these candidates before); torch.topk, not the matmul, takes most of its time, less
        in larger chunks. A CPU without bfloat16 instructions computes the matmul slower. Exact but for bfloat16's
        rounding, which may swap near-ties at the m-th place: the candidates are rescored from the float16 rows."""
        if self.scan is None:
            raise ValueError("RowStore.dense_top needs a store made with scan=True")
        q = torch.from_numpy(np.array(q_dense, dtype=np.float32)).bfloat16()  # a copy: q_dense may be read-only
        best_scores, best_rows = torch.empty(len(q), 0, dtype=torch.bfloat16), torch.empty(len(q), 0, dtype=torch.int64)
        for start in range(0, len(self.scan), SCAN_ROWS):
            scores = q @ self.scan[start:start + SCAN_ROWS].T  # [b, rows]
            top = torch.topk(scores, min(m, scores.shape[1]), dim=1)
            scores, rows = torch.cat([best_scores, top.values], 1), torch.cat([best_rows, top.indices + start], 1)
            keep = torch.topk(scores, min(m, scores.shape[1]), dim=1).indices
            best_scores, best_rows = scores.gather(1, keep), rows.gather(1, keep)
        return best_rows.numpy()

    def scores(self, q_dense: np.ndarray, q_vocab: np.ndarray, rows: np.ndarray, sparse_weight: float) -> np.ndarray:
        """dupmae scores [b, C] of rows [b, C] (-1: no candidate, scored -inf) for b queries, one query at a time
        (its C x k ids index the query's vocabulary vector, held in cache). float16 is widened by torch on one
        thread: numpy's conversion took 2.5x as long, and torch's threads 6x (600 candidates, 2 busy cores)."""
        scores = np.full(rows.shape, -np.inf, dtype=np.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for q, r in enumerate(rows):
                valid = r >= 0
                r = r[valid]  # sorted: the rows are read in order
                at = torch.from_numpy(q_vocab[q].take(self.ids[r]))  # [C, k]: the query at the kept entries
                sparse = (at * torch.from_numpy(self.values[r]).float()).sum(1).numpy()
                dense = torch.from_numpy(self.dense[r]).float().numpy() @ q_dense[q]
                scores[q, valid] = dense + sparse_weight * sparse
        finally:
            torch.set_num_threads(threads)
        return scores


def candidate_union(*parts: np.ndarray) -> np.ndarray:
    """Rows [b, sum of widths]: each query's candidates from all parts, sorted, repeats and misses as -1."""
    rows = np.sort(np.concatenate(parts, axis=1), axis=1)
    rows[:, 1:][rows[:, 1:] == rows[:, :-1]] = -1
    return rows


def indexed_dupmae_search(queries: Encoded, corpus: Encoded, depth: int, sparse_weight: float,
                          sparse_index: SeismicIndex, options: SearchOptions, index_factory: str | None = None,
                          timings: dict[str, float] | None = None, dense_index=None, store: RowStore | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Top-depth of the union of the sparse half's top `options.candidates` and the dense half's top
    `options.dense_candidates` (default the same), rescored by the dupmae formula from a RowStore; (scores, corpus
    rows) [Q, depth'] best first (-1 rows, -inf scores where the union holds fewer than depth' documents). The
    dense candidates come from `dense_index`, else a faiss index of `index_factory` built here, else (neither
    given) the RowStore's scan. `timings`, when given, accumulates the seconds of each part: dense_index (faiss
    add), store (the RowStore copy), dense, sparse, rescore; `store`: built before (else built here)."""
    _check_dupmae(queries, corpus)
    n = len(corpus.ids)
    depth, m = min(depth, n), min(max(options.candidates, depth), n)
    m_dense = min(max(options.dense_candidates or options.candidates, depth), n)
    clock = _Clock(timings)
    with clock("dense_index"):
        dense = dense_index or (index_factory and faiss_index(corpus.dense, index_factory, options.faiss_params))
    with clock("store"):
        store = store or RowStore(corpus, queries.vocab.shape[1], scan=not dense)
    all_scores, all_rows = [], []
    for qs in tqdm(range(0, len(queries.ids), QUERY_BATCH), desc="indexed dupmae search", unit="batch", mininterval=5):
        q_dense = np.ascontiguousarray(queries.dense[qs:qs + QUERY_BATCH], dtype=np.float32)  # [b, D]
        q_vocab = np.asarray(queries.vocab[qs:qs + QUERY_BATCH], dtype=np.float32)  # [b, V]
        with clock("dense"):
            dense_rows = dense.search(q_dense, m_dense)[1] if dense else store.dense_top(q_dense, m_dense)
        with clock("sparse"):
            sparse_rows = sparse_index.search(q_vocab, m, options.query_cut, options.heap_factor)  # [b, M]
        with clock("rescore"):
            rows = candidate_union(dense_rows, sparse_rows)  # [b, M + M_dense]
            scores = store.scores(q_dense, q_vocab, rows, sparse_weight)
        top_scores, pick = torch.topk(torch.from_numpy(scores), min(depth, rows.shape[1]), dim=1)
        top_rows = np.take_along_axis(rows, pick.numpy(), 1)
        top_rows[~np.isfinite(top_scores.numpy())] = -1
        all_scores.append(top_scores.numpy())
        all_rows.append(top_rows)
    return np.concatenate(all_scores), np.concatenate(all_rows)


class _Clock:
    """`with clock(name):` adds the block's seconds to timings[name] (nothing when timings is None)."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def merge_top(parts: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], depth: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, local rows) [Q, *] into the best `depth` by score, rows made global by offsets."""
    scores = np.concatenate([s for s, _ in parts], axis=1).astype(np.float32)
    rows = np.concatenate([np.where(r >= 0, r + off, -1) for (_, r), off in zip(parts, offsets)], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    top, pick = torch.topk(torch.from_numpy(scores), min(depth, scores.shape[1]), dim=1)
    return top.numpy(), np.take_along_axis(rows, pick.numpy(), 1)


IndexProvider = Callable[[int, Encoded, SearchOptions], SeismicIndex]


def build_index(shard_number: int, shard: Encoded, options: SearchOptions) -> SeismicIndex:
    """The default IndexProvider: a Seismic index built in memory (the pipeline's caches it per shard)."""
    return SeismicIndex.build(shard.sparse_indices, shard.sparse_values, options.seismic)


def search_shard(queries: Encoded, shard: Encoded, depth: int, index_factory: str | None, sparse_weight: float,
                 method: str, sparse_index: Callable[[], SeismicIndex], options: SearchOptions
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, shard rows) [Q, depth'] of one shard by `method` (dense, exact or seismic); [Q, 0] for an empty
    shard (more shards than documents), which neither search nor index build accepts."""
    if not shard.ids:
        return np.zeros((len(queries.ids), 0), np.float32), np.zeros((len(queries.ids), 0), np.int64)
    if method == "dense":
        return dense_search(queries, shard, depth, index_factory, options.faiss_params)
    if method == "exact":
        if index_factory:
            raise ValueError("--index_factory applies to dense search only, and to dupmae's dense candidates with "
                             "--sparse_index seismic; exact dupmae search is exact")
        return dupmae_search(queries, shard, depth, sparse_weight)
    return indexed_dupmae_search(queries, shard, depth, sparse_weight, sparse_index(), options, index_factory)


def search(queries: Encoded, corpus: Encoded | Sequence[Encoded], depth: int, index_factory: str | None = None,
           sparse_weight: float = 1.0, options: SearchOptions | None = None,
           index_for: IndexProvider = build_index) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} with `depth` documents per query, never the query's own id (sparse_weight:
    the dupmae score's weight on the sparse part). `corpus` may be a list of shards, searched one by one and
    merged; `index_for(shard number, shard, options)` gives a shard's sparse index (--sparse_index seismic)."""
    shards = [s for s in ([corpus] if isinstance(corpus, Encoded) else corpus) if s.ids]
    if not shards:
        raise ValueError("search: the corpus holds no documents")
    options = options or SearchOptions()
    total = sum(len(s.ids) for s in shards)
    dupmae = any(s.sparse_indices is not None for s in shards)
    method = options.method(total) if dupmae else "dense"
    logger.info("search: %d documents in %d shard(s), %s", total, len(shards), method)
    parts, offsets, ids, offset = [], [], [], 0
    for number, shard in enumerate(shards):
        parts.append(search_shard(queries, shard, depth + 1, index_factory, sparse_weight, method,
                                  lambda: index_for(number, shard, options), options))
        offsets.append(offset)
        offset += len(shard.ids)
        ids.extend(shard.ids)
    scores, rows = parts[0] if len(parts) == 1 else merge_top(parts, offsets, depth + 1)
    return ranking_from_hits(queries.ids, ids, scores, rows, depth)


def ranking_from_hits(query_ids: list[str], ids: list[str], scores: np.ndarray, rows: np.ndarray, depth: int
                      ) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}}: each query's first `depth` hits other than its own id (rows index `ids`)."""
    run = {}
    for qid, q_scores, q_rows in zip(query_ids, scores.tolist(), rows.tolist()):
        hits = {}
        for s, r in zip(q_scores, q_rows):
            if r < 0:  # faiss pads with -1 when an approximate index finds fewer hits; so does a small union
                continue
            doc_id = ids[r]
            if doc_id != qid and len(hits) < depth:
                hits[doc_id] = float(s)
        run[qid] = hits
    return run
