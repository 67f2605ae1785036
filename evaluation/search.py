"""Top-k search over encoded corpora: faiss inner product (dense), exact dense + sparse (dupmae).

The dupmae score is <q,d> = q_dense·d_dense + w_s Σ_{i ∈ kept(d)} q_vocab[i] d_vocab[i]: the corpus's kept entries
form a CSR matrix D [N, V], so one query batch costs a dense matmul plus D @ q_vocabᵀ (N·k per query), exact.
Both searches fetch one extra hit so a document with the query's own id can be dropped (BEIR's convention).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from evaluation.encode import Encoded

logger = logging.getLogger(__name__)

QUERY_BATCH = 256  # queries scored at once
DOC_CHUNK = 1 << 20  # corpus rows scored at once in the exact sparse search (bounds the [Q, N] score block)


def dense_search(queries: Encoded, corpus: Encoded, depth: int, index_factory: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, corpus rows), both [Q, depth'], best first, with faiss (IndexFlatIP unless a factory is given)."""
    import faiss

    dim = corpus.dense.shape[1]
    if index_factory:
        index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(corpus.dense)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(corpus.dense))
    return index.search(np.ascontiguousarray(queries.dense), min(depth, len(corpus.ids)))


def _corpus_csr(corpus: Encoded, start: int, stop: int, vocab_size: int):
    """Rows start:stop of the documents' kept entries as a scipy CSR matrix [rows, V]."""
    from scipy.sparse import csr_matrix

    idx = corpus.sparse_indices[start:stop]  # [n, k]
    val = corpus.sparse_values[start:stop]  # [n, k]
    n, k = idx.shape
    return csr_matrix((val.reshape(-1), idx.reshape(-1), np.arange(0, n * k + 1, k)), shape=(n, vocab_size))


def dupmae_search(queries: Encoded, corpus: Encoded, depth: int, sparse_weight: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-depth by dense dot + sparse_weight x sparse (document top-k) score; (scores, corpus rows)
    [Q, depth'] best first."""
    if queries.vocab is None or corpus.sparse_indices is None:
        raise ValueError("dupmae search needs query vocab vectors and document sparse entries")
    depth = min(depth, len(corpus.ids))
    vocab_size = queries.vocab.shape[1]
    all_scores, all_rows = [], []
    chunks = [(s, min(s + DOC_CHUNK, len(corpus.ids))) for s in range(0, len(corpus.ids), DOC_CHUNK)]
    csr = [_corpus_csr(corpus, s, e, vocab_size) for s, e in chunks]
    doc_dense = torch.from_numpy(corpus.dense)
    for qs in tqdm(range(0, len(queries.ids), QUERY_BATCH), desc="dupmae search", unit="batch", mininterval=5):
        q_dense = torch.from_numpy(queries.dense[qs:qs + QUERY_BATCH])  # [b, D]
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


def search(queries: Encoded, corpus: Encoded, depth: int, index_factory: str | None = None,
           sparse_weight: float = 1.0) -> dict[str, dict[str, float]]:
    """{query id: {doc id: score}} with `depth` documents per query, never the query's own id (sparse_weight:
    the dupmae score's weight on the sparse part)."""
    if corpus.sparse_indices is not None:
        if index_factory:
            raise ValueError("--index_factory applies to dense search only; dupmae search is exact")
        scores, rows = dupmae_search(queries, corpus, depth + 1, sparse_weight)
    else:
        scores, rows = dense_search(queries, corpus, depth + 1, index_factory)
    run = {}
    for qid, q_scores, q_rows in zip(queries.ids, scores.tolist(), rows.tolist()):
        hits = {}
        for s, r in zip(q_scores, q_rows):
            if r < 0:  # faiss pads with -1 when an approximate index finds fewer hits
                continue
            doc_id = corpus.ids[r]
            if doc_id != qid and len(hits) < depth:
                hits[doc_id] = float(s)
        run[qid] = hits
    return run
