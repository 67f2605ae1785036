"""Search at scale: the indexed dupmae search against the exact one, shard merging, the memory-mapped cache, the
sparse-index cache (refusal, kills) and the bad-input lines (issue 29). Tiny synthetic corpora, seconds."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation import cache
from evaluation import search as search_mod
from evaluation.data import DatasetError
from evaluation.encode import Encoded
from evaluation.pipeline import check_sparse
from evaluation.search import SearchOptions
from evaluation.sparse_index import SeismicConfig, SeismicIndex, index_record, load_or_build

REPO = Path(__file__).resolve().parents[1]
VOCAB, K, DIM = 2000, 24, 16


def corpus_and_queries(n_docs: int, n_queries: int, seed: int = 0) -> tuple[Encoded, Encoded]:
    """Documents' top-K positive entries over a Zipf-like vocabulary, queries' whole vectors, as dupmae encodes."""
    g = np.random.default_rng(seed)
    prior = 1.0 / np.arange(1, VOCAB + 1) ** 0.8

    def vocab(n):
        return (g.gamma(0.3, 1.0, (n, VOCAB)) * prior).astype(np.float32)  # [n, V], most mass on few ids

    docs = vocab(n_docs)
    idx = np.argsort(-docs, axis=1)[:, :K].astype(np.int32)
    dense = g.normal(size=(n_docs, DIM)).astype(np.float32)
    corpus = Encoded([f"d{i}" for i in range(n_docs)], dense, idx, np.take_along_axis(docs, idx, 1))
    queries = Encoded([f"q{i}" for i in range(n_queries)], g.normal(size=(n_queries, DIM)).astype(np.float32),
                      vocab=vocab(n_queries))
    return corpus, queries


def top_sets(run: dict, depth: int) -> dict:
    return {q: list(hits)[:depth] for q, hits in run.items()}


def test_indexed_search_with_all_candidates_equals_exact():
    corpus, queries = corpus_and_queries(1500, 12)
    exact = search_mod.search(queries, corpus, depth=20, sparse_weight=0.5)
    options = SearchOptions("seismic", candidates=1500, query_cut=VOCAB, heap_factor=1.0,
                            seismic=SeismicConfig(doc_top=8))
    indexed = search_mod.search(queries, corpus, depth=20, sparse_weight=0.5, options=options)
    assert top_sets(indexed, 20) == top_sets(exact, 20)
    for q in exact:  # the rescoring is the exact formula
        np.testing.assert_allclose([indexed[q][d] for d in exact[q]], list(exact[q].values()), rtol=1e-5)


def test_indexed_search_few_candidates_keeps_the_exact_top10():
    corpus, queries = corpus_and_queries(3000, 20, seed=1)
    exact = top_sets(search_mod.search(queries, corpus, depth=10, sparse_weight=1.0), 10)
    options = SearchOptions("seismic", candidates=200, query_cut=32, heap_factor=0.9)
    indexed = top_sets(search_mod.search(queries, corpus, depth=10, sparse_weight=1.0, options=options), 10)
    recall = np.mean([len(set(indexed[q]) & set(exact[q])) / 10 for q in exact])
    assert recall >= 0.95, recall


def test_shards_merge_to_the_unsharded_ranking(tmp_path):
    corpus, queries = corpus_and_queries(900, 6, seed=2)
    for i, (lo, hi) in enumerate([(0, 300), (300, 301), (301, 900)]):  # a one-document shard too
        cache.save(tmp_path, f"shard{i}", Encoded(corpus.ids[lo:hi], corpus.dense[lo:hi],
                                                  corpus.sparse_indices[lo:hi], corpus.sparse_values[lo:hi]), {})
    shards = [cache.load(tmp_path, f"shard{i}") for i in range(3)]
    assert isinstance(shards[0].sparse_values, np.memmap)  # read back memory-mapped, not loaded
    np.testing.assert_array_equal(np.concatenate([s.sparse_indices for s in shards]), corpus.sparse_indices)
    whole = search_mod.search(queries, corpus, depth=15)
    assert top_sets(search_mod.search(queries, shards, depth=15), 15) == top_sets(whole, 15)
    indexed = search_mod.search(queries, shards, depth=15, options=SearchOptions("seismic", candidates=900,
                                                                                 query_cut=VOCAB, heap_factor=1.0))
    assert top_sets(indexed, 15) == top_sets(whole, 15)


def test_auto_is_exact_below_the_threshold(monkeypatch):
    assert SearchOptions("auto").method(search_mod.EXACT_BELOW - 1) == "exact"
    assert SearchOptions("auto").method(search_mod.EXACT_BELOW) == "seismic"
    with pytest.raises(ValueError, match="sparse_index"):
        SearchOptions("pisa")


def test_bad_sparse_entries_name_the_file(tmp_path):
    corpus, queries = corpus_and_queries(10, 2)
    cache.save(tmp_path, "nosparse", Encoded(corpus.ids, corpus.dense), {})
    with pytest.raises(DatasetError, match=r"nosparse/sparse_indices.npy: missing"):
        check_sparse(cache.load(tmp_path, "nosparse"), queries, top_k=K)
    cache.save(tmp_path, "otherk", Encoded(corpus.ids, corpus.dense, corpus.sparse_indices[:, :5],
                                           corpus.sparse_values[:, :5]), {})
    with pytest.raises(DatasetError, match=rf"otherk/sparse_indices.npy: shape \(10, 5\).*expects \[10, {K}\]"):
        check_sparse(cache.load(tmp_path, "otherk"), queries, top_k=K)
    check_sparse(corpus, queries, top_k=K)  # the right k passes


def test_index_for_another_model_or_k_is_refused_and_rebuilt(tmp_path, caplog):
    corpus, queries = corpus_and_queries(400, 4)
    folder = tmp_path / "shard.seismic"
    record = index_record("shard", {"name": "model-a"}, K, 400, SeismicConfig())
    load_or_build(folder, record, corpus.sparse_indices, corpus.sparse_values)
    with caplog.at_level(logging.INFO, logger="evaluation.sparse_index"):
        load_or_build(folder, record, corpus.sparse_indices, corpus.sparse_values)
        assert "cache hit" in caplog.text
        other = index_record("shard", {"name": "model-b"}, 5, 400, SeismicConfig())
        index = load_or_build(folder, other, corpus.sparse_indices, corpus.sparse_values)
    assert "refused, built for another model/top_k; rebuilding" in caplog.text
    assert json.loads((folder / "index.json").read_text())["model"] == {"name": "model-b"}
    assert index.search(queries.vocab, 5, 32, 1.0).shape == (4, 5)


KILLED_BUILD = """
import os, signal, sys
import numpy as np
from evaluation import sparse_index
corpus = np.load(sys.argv[2])
def save_then_die(self, folder):
    self.index.save(str(folder / sparse_index.INDEX_FILE))
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the index file, before its record
sparse_index.SeismicIndex.save = save_then_die
record = sparse_index.index_record("shard", {}, 24, len(corpus["indices"]), sparse_index.SeismicConfig())
sparse_index.load_or_build(sys.argv[1], record, corpus["indices"], corpus["values"])
"""


def test_a_killed_index_build_leaves_nothing_trusted(tmp_path):
    corpus, _ = corpus_and_queries(300, 1)
    np.savez(tmp_path / "corpus.npz", indices=corpus.sparse_indices, values=corpus.sparse_values)
    folder = tmp_path / "cache" / "shard.seismic"
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(folder), str(tmp_path / "corpus.npz")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not folder.exists()  # only the temporary folder, which no load trusts
    (left,) = folder.parent.iterdir()
    assert left.name.startswith(".shard.seismic.tmp-") and (left / "seismic.index.seismic").is_file()
    record = index_record("shard", {}, K, 300, SeismicConfig())
    load_or_build(folder, record, corpus.sparse_indices, corpus.sparse_values)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["shard.seismic"]  # the dead writer's folder swept


def test_seismic_index_round_trip(tmp_path):
    corpus, queries = corpus_and_queries(500, 3)
    index = SeismicIndex.build(corpus.sparse_indices, corpus.sparse_values)
    index.save(tmp_path)
    again = SeismicIndex.load(tmp_path, 500)
    np.testing.assert_array_equal(again.search(queries.vocab, 10, 32, 1.0), index.search(queries.vocab, 10, 32, 1.0))
