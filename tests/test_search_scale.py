"""Search at scale: the indexed dupmae search against the exact one, shard merging, the memory-mapped cache, the
sparse-index cache (refusal, kills) and the bad-input lines (issue 29). Tiny synthetic corpora, seconds."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

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
    every = search_mod.search(queries, corpus, depth=1500, sparse_weight=0.5)  # exact scores of all documents
    for q in exact:  # the rescoring is the dupmae formula on float16 rows: within 1e-3 of a score's size
        tol = 1e-3 * max(abs(v) for v in every[q].values())
        np.testing.assert_allclose(list(indexed[q].values()), [every[q][d] for d in indexed[q]], atol=tol)
        assert min(every[q][d] for d in indexed[q]) >= list(exact[q].values())[-1] - 2 * tol  # a top-20, near-ties
        assert len(set(indexed[q]) & set(exact[q])) >= 19


def test_indexed_search_few_candidates_keeps_the_exact_top10():
    corpus, queries = corpus_and_queries(3000, 20, seed=1)
    exact = top_sets(search_mod.search(queries, corpus, depth=10, sparse_weight=1.0), 10)
    options = SearchOptions("seismic", candidates=200, query_cut=32, heap_factor=0.9)
    indexed = top_sets(search_mod.search(queries, corpus, depth=10, sparse_weight=1.0, options=options), 10)
    recall = np.mean([len(set(indexed[q]) & set(exact[q])) / 10 for q in exact])
    assert recall >= 0.95, recall


class NoDense:
    """A dense index that finds nothing: the indexed search's candidates are then Seismic's alone."""

    def search(self, q_dense, m):
        return np.full((len(q_dense), m), -np.inf, np.float32), np.full((len(q_dense), m), -1, np.int64)


def test_sparse_only_candidates_reach_the_exact_sparse_ranking():
    """Seismic's batch_search returns the queries' hits out of their order (each hit names its query); filed by
    position, a query got another's candidates (issue 36: recall@20 0.40). Dense off, the ranking is Seismic's."""
    corpus, queries = corpus_and_queries(3000, 40, seed=3)
    corpus.dense[:] = 0  # the score is the sparse half's alone
    exact_scores, exact = search_mod.dupmae_search(queries, corpus, 20, sparse_weight=1.0)
    index = SeismicIndex.build(corpus.sparse_indices, corpus.sparse_values, SeismicConfig(doc_top=K))
    options = SearchOptions("seismic", candidates=100, query_cut=VOCAB, heap_factor=1.0)
    scores, rows = search_mod.indexed_dupmae_search(queries, corpus, 20, 1.0, index, options, dense_index=NoDense())
    recall = np.mean([len(set(r) & set(e)) / 20 for r, e in zip(rows, exact)])
    assert recall >= 0.99, recall
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], rtol=1e-3)  # every query's best document found


@pytest.mark.parametrize("m", [3, 7, 10, 50])  # within a chunk, a chunk's size, across chunks, the whole corpus
def test_dense_scan_returns_the_exact_dense_top_m(m, monkeypatch):
    """RowStore.dense_top alone, in chunks of 7 rows over 50 (the running top m merged across chunk boundaries, a
    chunk smaller than m): the rows' dense scores are the exact top m's. Small integer vectors, so that bfloat16
    holds them and their dot products exactly; ties compare by score, not by row."""
    monkeypatch.setattr(search_mod, "SCAN_ROWS", 7)
    g = np.random.default_rng(m)
    n, b = 50, 6
    corpus = Encoded([f"d{i}" for i in range(n)], g.integers(-4, 5, (n, DIM)).astype(np.float32),
                     np.zeros((n, K), np.int32), np.ones((n, K), np.float32))
    q_dense = g.integers(-4, 5, (b, DIM)).astype(np.float32)
    store = search_mod.RowStore(corpus, VOCAB, scan=True)
    exact = q_dense @ corpus.dense.T  # [b, n]
    threads = torch.get_num_threads()
    try:
        for used in (1, 2):  # torch's matmul and topk on one thread and on two
            torch.set_num_threads(used)
            rows = store.dense_top(q_dense, m)
            assert rows.shape == (b, m)
            assert all(len(set(r)) == m for r in rows)  # no row twice
            for q in range(b):
                np.testing.assert_array_equal(np.sort(exact[q, rows[q]]), np.sort(exact[q])[-m:])
    finally:
        torch.set_num_threads(threads)


def test_dense_candidates_over_the_whole_corpus_give_the_exact_ranking():
    """--dense_candidates apart from --candidates: with every document a dense candidate (the scan, no faiss index)
    the union is the corpus, so the rescored top-20 is the exact one though the sparse half gives 5 candidates."""
    corpus, queries = corpus_and_queries(800, 10, seed=4)
    exact_scores, exact = search_mod.dupmae_search(queries, corpus, 20, sparse_weight=1.0)
    index = SeismicIndex.build(corpus.sparse_indices, corpus.sparse_values, SeismicConfig(doc_top=K))
    few = SearchOptions("seismic", candidates=5, query_cut=8, heap_factor=0.9)
    _, rows_few = search_mod.indexed_dupmae_search(queries, corpus, 20, 1.0, index, few)
    every = SearchOptions("seismic", candidates=5, dense_candidates=800, query_cut=8, heap_factor=0.9)
    scores, rows = search_mod.indexed_dupmae_search(queries, corpus, 20, 1.0, index, every)
    recall = np.mean([len(set(r) & set(e)) / 20 for r, e in zip(rows, exact)])
    assert recall >= 0.99, recall  # float16 rescoring: a near-tie at the 20th place may swap
    assert np.mean([len(set(r) & set(e)) / 20 for r, e in zip(rows_few, exact)]) < recall  # the option counts
    np.testing.assert_allclose(scores[:, 0], exact_scores[:, 0], rtol=1e-3)
    with pytest.raises(ValueError, match="dense_candidates"):
        SearchOptions("seismic", dense_candidates=0)


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
    assert all(len(set(indexed[q]) & set(whole[q])) >= 14 for q in whole)  # float16 rescoring: a near-tie may swap


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
    assert left.name.startswith(f".shard.seismic.tmp-{cache._host()}-") and (left / "seismic.index.seismic").is_file()
    elsewhere = folder.parent / ".shard.seismic.tmp-othernode-1-0123abcd"  # another node's build, same cache folder
    (elsewhere / "seismic.index.seismic").parent.mkdir()
    (elsewhere / "seismic.index.seismic").write_bytes(b"half")
    record = index_record("shard", {}, K, 300, SeismicConfig())
    load_or_build(folder, record, corpus.sparse_indices, corpus.sparse_values)
    assert left.exists()  # written a moment ago: its writer may be alive (PIDs say nothing across namespaces)
    old = time.time() - cache.STALE_AFTER_SECONDS - 60
    for path in (left, left / "seismic.index.seismic", elsewhere, elsewhere / "seismic.index.seismic"):
        os.utime(path, (old, old))
    legacy = folder.parent / ".shard.seismic.tmp-4242"  # the code before host names: no host to tell
    legacy.mkdir()
    os.utime(legacy, (old, old))
    load_or_build(folder, record, corpus.sparse_indices, corpus.sparse_values)
    assert not left.exists() and elsewhere.exists()  # this host's stale folder swept; the other host's left alone
    assert not legacy.exists()  # and the old code's, stale for hours


def test_two_writers_with_one_pid_do_not_share_a_temporary_folder(tmp_path, monkeypatch):
    """Two shard tasks that are both PID 1 (containers) or share a PID on two nodes write the same cache entry at
    once: each writes its own temporary folder, the first rename wins, and the entry is whole (issue 34 item 5)."""
    monkeypatch.setattr(os, "getpid", lambda: 1)
    save = np.save
    first = {"a": np.arange(5), "b": np.arange(7)}

    def save_while_another_writes(path, array):
        if path.name == "a.npy" and array.sum() == first["a"].sum():  # the first writer, midway
            monkeypatch.setattr(np, "save", save)
            cache.save_arrays(tmp_path, "entry", {"a": array + 1, "b": first["b"] + 1}, {"writer": 2})
        save(path, array)

    monkeypatch.setattr(np, "save", save_while_another_writes)
    cache.save_arrays(tmp_path, "entry", first, {"writer": 1})  # the old `.entry.tmp-1`: FileNotFoundError here
    entry = cache.load_arrays(tmp_path / "entry", ("a", "b"))
    np.testing.assert_array_equal(entry["a"], first["a"] + 1)
    np.testing.assert_array_equal(entry["b"], first["b"] + 1)  # the second writer's entry, whole
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # the loser's temporary folder removed


def test_seismic_index_round_trip(tmp_path):
    corpus, queries = corpus_and_queries(500, 3)
    index = SeismicIndex.build(corpus.sparse_indices, corpus.sparse_values)
    index.save(tmp_path)
    again = SeismicIndex.load(tmp_path, 500)
    np.testing.assert_array_equal(again.search(queries.vocab, 10, 32, 1.0), index.search(queries.vocab, 10, 32, 1.0))


def test_seismic_serves_the_exported_sparse_encoder(minilm_path, tmp_path):
    """Serving: the sentence-transformers SparseEncoder of a dupmae export feeds Seismic as it is (its document
    vectors' ids and values), and Seismic's top-5 for its query vectors is the exact sparse dot product's."""
    import torch
    from sentence_transformers import SparseEncoder
    from transformers import BertConfig, BertForMaskedLM

    from benchmarks.smoke import NEAR_MISSES, TOPICS
    from common.representation import Encoder, RepresentationConfig
    from common.st_modules import SPARSE_DIR
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=len(tokenizer), max_position_embeddings=64)).eval()
    config = RepresentationConfig(kind="dupmae", top_k=16, normalize=True, sparse_values="probs", dense_dim=32)
    Encoder(mlm, config, torch.nn.Linear(32, 32)).save_pretrained(tmp_path / "export", tokenizer)
    sparse = SparseEncoder(str(tmp_path / "export" / SPARSE_DIR), device="cpu", trust_remote_code=True)
    docs = [passage for passage, _ in TOPICS] + NEAR_MISSES
    doc_vectors = sparse.encode_document(docs, convert_to_tensor=True).to_dense()  # [N, V], top 16 kept
    query_vectors = sparse.encode_query([query for _, query in TOPICS], convert_to_tensor=True).to_dense()  # [Q, V]
    values, indices = torch.topk(doc_vectors, 16, dim=1)
    index = SeismicIndex.build(indices.numpy(), values.numpy(), SeismicConfig(doc_top=16))
    for row in range(len(docs)):  # Seismic holds each document's vector as the SparseEncoder gave it
        components, stored = index.index.get(row)
        kept = doc_vectors[row].nonzero().squeeze(1)
        assert sorted(int(c) for c in components) == kept.tolist()
        np.testing.assert_allclose(sorted(stored), sorted(doc_vectors[row, kept].tolist()), rtol=1e-3)
    found = index.search(query_vectors.numpy(), 5, query_cut=64, heap_factor=1.0)  # [Q, 5] document rows
    assert (found >= 0).all() and all(len(set(r)) == 5 for r in found)
    scores = (query_vectors @ doc_vectors.T).numpy()  # [Q, N] exact sparse dot products
    # Seismic's search is approximate (pruned postings, block summaries); its top-1 must be a near-best document
    assert (np.take_along_axis(scores, found[:, :1], 1)[:, 0] >= 0.9 * scores.max(1)).all()


def test_a_synthetic_corpus_is_rebuilt_from_other_real_sets(tmp_path):
    """benchmarks/search_scale.py reused any `n{size}` corpus at its path; it is keyed on the real entries it was
    drawn from (their cache keys name the model and data), so other bases build it again."""
    from benchmarks.search_scale import synthesize

    for name, seed in (("base_a", 4), ("base_b", 5)):
        corpus, _ = corpus_and_queries(40, 1, seed=seed)
        cache.save(tmp_path, name, corpus, {})
    out = tmp_path / "synthetic" / "n200"
    first = np.array(cache.load(out.parent, synthesize([tmp_path / "base_a"], 200, out).name).sparse_indices)
    written = (out / "ids.json").stat().st_mtime_ns
    synthesize([tmp_path / "base_a"], 200, out)
    assert (out / "ids.json").stat().st_mtime_ns == written  # the same bases: reused
    other = cache.load(out.parent, synthesize([tmp_path / "base_b"], 200, out).name)
    assert set(np.unique(other.sparse_indices)) <= set(np.unique(cache.load(tmp_path, "base_b").sparse_indices))
    assert not np.array_equal(other.sparse_indices, first)


def test_a_synthetic_corpus_is_rebuilt_from_a_base_replaced_in_place(tmp_path):
    """Keyed on its bases' folder names, a synthetic corpus outlived a base replaced in place (same name, other
    ids and rows); keyed on their content digests it is built again. Its digest.json is written with it, equal to
    the digest of what a load reads."""
    from benchmarks.search_scale import synthesize

    corpus, _ = corpus_and_queries(40, 1, seed=4)
    cache.save(tmp_path, "base", corpus, {"documents": True})
    out = tmp_path / "synthetic" / "n200"
    synthesize([tmp_path / "base"], 200, out)
    first = cache.load(out.parent, out.name)
    assert json.loads((out / "key.json").read_text())["bases"] == [cache.load(tmp_path, "base").digest]
    assert first.digest == cache.content_digest(first.ids, cache.load_arrays(out, Encoded.ARRAYS))
    replaced, _ = corpus_and_queries(40, 1, seed=6)
    replaced.ids = [f"r{i}" for i in range(40)]
    cache.save(tmp_path, "base", replaced, {"documents": True}, replace=True)  # the same folder name
    synthesize([tmp_path / "base"], 200, out)
    assert json.loads((out / "key.json").read_text())["bases"] == [cache.load(tmp_path, "base").digest]  # again
    again = cache.load(out.parent, out.name)
    assert set(np.unique(again.sparse_indices)) <= set(np.unique(replaced.sparse_indices))
    assert not np.array_equal(np.asarray(again.sparse_indices), np.asarray(first.sparse_indices))
    assert again.digest == cache.content_digest(again.ids, cache.load_arrays(out, Encoded.ARRAYS)) != first.digest


def test_the_benchmark_worker_keys_its_index_as_the_pipeline_does(tmp_path, caplog, capsys):
    """benchmarks/search_scale.py's worker keyed a corpus's Seismic index on the entry's folder name: an entry
    replaced in place (same name, other ids) reused an index of the old rows. Keyed on the content digest with the
    entry's model, its record is the pipeline's: either reuses the other's index, and a replaced entry rebuilds."""
    from types import SimpleNamespace

    from benchmarks import search_scale
    from evaluation.pipeline import Evaluator

    model = {"path": "/models/dupmae", "files": [["config.json", 10, 123]]}
    key = {"model": model, "representation": {"kind": "dupmae"}, "max_length": 64, "documents": True}
    corpus, queries = corpus_and_queries(400, 3, seed=8)
    cache.save(tmp_path, "entry", corpus, key)
    cache.save(tmp_path, "queries", queries, {**key, "documents": False})
    argv = ["--worker", "build", "--corpus", str(tmp_path / "entry"), "--queries", str(tmp_path / "queries"),
            "--rows", str(tmp_path / "rows.npy")]
    search_scale.main(argv)
    record = json.loads((tmp_path / "entry.seismic" / "index.json").read_text())
    assert record["corpus"] == cache.load(tmp_path, "entry").digest and record["model"] == model
    with caplog.at_level(logging.INFO, logger="evaluation.sparse_index"):
        Evaluator.sparse_index(SimpleNamespace(settings={"model": model}), cache.load(tmp_path, "entry"),
                               SearchOptions())
    assert "sparse index cache hit" in caplog.text and "refused" not in caplog.text  # the pipeline's own record
    caplog.clear()
    order = np.random.default_rng(8).permutation(400)  # the same name, other ids and rows
    cache.save(tmp_path, "entry", Encoded([f"e{i}" for i in order], corpus.dense[order],
                                          corpus.sparse_indices[order], corpus.sparse_values[order]), key,
               replace=True)
    with caplog.at_level(logging.INFO, logger="evaluation.sparse_index"):
        search_scale.main(argv)
    assert "refused, built for another corpus; rebuilding" in caplog.text
    assert json.loads((tmp_path / "entry.seismic" / "index.json").read_text())["corpus"] == cache.load(
        tmp_path, "entry").digest
    capsys.readouterr()


SPARSE_ALONE = """
import sys
import numpy as np
from evaluation.sparse_index import SeismicConfig, SeismicIndex
data = np.load(sys.argv[1])
index = SeismicIndex.build(data["indices"], data["values"], SeismicConfig(doc_top=data["indices"].shape[1]))
np.save(sys.argv[2], index.search(data["queries"], 10, data["queries"].shape[1], 1.0))
"""


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_seismic_alone_files_each_query_its_own_brute_force_hits(tmp_path, threads):
    """SeismicIndex.search alone against the brute-force sparse dot product, queries in a shuffled, non-contiguous
    order (a query with no positive entry among them), under several Rayon thread counts: Seismic answers a batch
    out of order, so hits filed by position go to another query."""
    corpus, queries = corpus_and_queries(1200, 60, seed=7)
    picked = np.random.default_rng(7).permutation(60)[:37]  # shuffled, with gaps
    vocab = queries.vocab[picked].copy()
    vocab[5] = 0  # nothing to search with: stays -1
    np.savez(tmp_path / "data.npz", indices=corpus.sparse_indices, values=corpus.sparse_values, queries=vocab)
    proc = subprocess.run([sys.executable, "-c", SPARSE_ALONE, str(tmp_path / "data.npz"), str(tmp_path / "rows.npy")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": str(threads)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = np.load(tmp_path / "rows.npy")
    exact = np.einsum("qnk,nk->qn", vocab[:, corpus.sparse_indices], corpus.sparse_values)  # [Q, N]
    assert (rows[5] == -1).all()
    for q in np.delete(np.arange(len(vocab)), 5):
        found = np.sort(exact[q, rows[q]])[::-1]  # Seismic holds values in half precision: near-ties may swap
        np.testing.assert_allclose(found, np.sort(exact[q])[::-1][:10], rtol=1e-3)  # each query's own top 10


@pytest.mark.parametrize("widths", [(5, 5), (3, 11), (12, 1)])
def test_candidate_union_alone_equals_the_sorted_set_union(widths):
    """candidate_union against a set union per row: the row's non-negative entries are the sorted union of both
    parts' non-negative ids, every other entry -1 (misses, and repeats within and across the parts), for unsorted
    parts of different widths with -1 in both."""
    g = np.random.default_rng(sum(widths))
    b = 40
    dense, sparse = g.integers(0, 12, (b, widths[0])), g.integers(0, 12, (b, widths[1]))  # many repeats
    dense[g.random(dense.shape) < 0.2] = -1
    sparse[g.random(sparse.shape) < 0.2] = -1
    dense[0], sparse[0] = -1, -1  # nothing found by either half
    dense[1, 0] = sparse[1] = 5  # one id, in both halves and repeated
    rows = search_mod.candidate_union(dense.copy(), sparse.copy())
    assert rows.shape == (b, sum(widths))
    for row, d, s in zip(rows, dense, sparse):
        union = sorted({int(i) for i in np.concatenate([d, s]) if i >= 0})
        assert row[row >= 0].tolist() == union
        assert (row[row < 0] == -1).all() and (row < 0).sum() == sum(widths) - len(union)


@pytest.mark.parametrize("vocab_size", [300, 1 << 16, 70_000])  # uint16 ids up to the last one that fits, int32 past
def test_row_store_scores_equal_the_float32_formula(vocab_size, tmp_path, monkeypatch):
    """RowStore alone against the dupmae formula in float32 on the original rows: candidates in any order, with
    gaps (-1, scored -inf), repeated rows and the vocabulary's last id. The store is copied from the corpus as the
    cache reads it back (memory-mapped) in chunks of 7 rows, 50 not a multiple: every chunk boundary is crossed."""
    monkeypatch.setattr(search_mod, "ADD_ROWS", 7)
    g = np.random.default_rng(vocab_size)
    n, k, b, c = 50, 6, 5, 30
    idx = np.stack([g.choice(vocab_size, k, replace=False) for _ in range(n)]).astype(np.int32)
    idx[7, 0] = vocab_size - 1
    corpus = Encoded([f"d{i}" for i in range(n)], g.normal(size=(n, DIM)).astype(np.float32), idx,
                     g.gamma(1.0, 1.0, (n, k)).astype(np.float32))
    cache.save(tmp_path, "corpus", corpus, {})
    mapped = cache.load(tmp_path, "corpus")
    assert isinstance(mapped.dense, np.memmap) and isinstance(mapped.sparse_indices, np.memmap)
    q_dense = g.normal(size=(b, DIM)).astype(np.float32)
    q_vocab = g.gamma(0.5, 1.0, (b, vocab_size)).astype(np.float32)
    rows = g.integers(0, n, (b, c))
    rows[:, 0] = 7
    rows[g.random((b, c)) < 0.2] = -1
    store = search_mod.RowStore(mapped, vocab_size)
    np.testing.assert_array_equal(store.dense, corpus.dense.astype(np.float16))  # every row copied, once
    np.testing.assert_array_equal(store.ids, idx)
    np.testing.assert_array_equal(store.values, corpus.sparse_values.astype(np.float16))
    scores = store.scores(q_dense, q_vocab, rows, 0.7)
    safe = np.where(rows >= 0, rows, 0)
    exact = (np.einsum("bcd,bd->bc", corpus.dense[safe], q_dense)
             + 0.7 * (q_vocab[np.arange(b)[:, None, None], idx[safe]] * corpus.sparse_values[safe]).sum(-1))
    assert np.isneginf(scores[rows < 0]).all()
    size = np.abs(exact).max(1, keepdims=True)  # float16 rows: within 1e-3 of a score's size
    assert np.all(np.abs(scores - exact)[rows >= 0] <= 1e-3 * np.broadcast_to(size, rows.shape)[rows >= 0])


LOAD_PEAK = """
import sys
from common.memory import peak_rss_bytes
from evaluation import cache
cache.DIGEST_CHUNK = 1 << 20
before = peak_rss_bytes()
cache.load(sys.argv[1], "entry")
print((peak_rss_bytes() - before) / 2**20)
"""


def test_hashing_an_entry_without_its_digest_keeps_the_corpus_out_of_the_resident_set(tmp_path):
    """An entry written before digest.json was recorded is hashed on load; memory-mapped, its pages must not all
    stay resident (a benchmark worker's peak RSS then held the whole corpus: 460 MB more at 100k documents)."""
    n = 20_000
    entry = Encoded([f"d{i}" for i in range(n)], np.ones((n, 640), np.float32), np.ones((n, 640), np.int32),
                    np.ones((n, 640), np.float32))  # 147 MB of arrays
    cache.save(tmp_path, "entry", entry, {})
    (tmp_path / "entry" / "digest.json").unlink()
    proc = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 25, proc.stdout  # a few 1 MB chunks, the ids (7 MB); not one 49 MB array, nor all
    assert cache.load(tmp_path, "entry").digest == entry.digest


def test_a_previous_runs_scan_lines_are_relabeled_and_the_scan_extrapolated_linearly(tmp_path, capsys):
    """`--from_jsonl` on lines of the dense scan: its default (by dense_candidates) is the figure, and its dense
    time grows linearly with the corpus (it scores every document), unlike HNSW's log N."""
    from benchmarks import search_scale

    m, cut, dense_m = search_scale.DEFAULT["scan"]
    lines = []
    for docs, ours in ((300_000, 0.002), (1_000_000, 0.004)):
        for dense_candidates in (dense_m, 1000):
            lines.append({"bench": "search_scale", "corpus": "synthetic", "docs": docs, "metric": "curve_sec_per_query",
                          "ours": ours, "baseline": ours * 25, "candidates": m, "query_cut": cut,
                          "dense_candidates": dense_candidates, "dense_index": "scan,bf16",
                          "dense_sec_per_query": ours / 2, "sparse_sec_per_query": ours / 4,
                          "rescore_sec_per_query": ours / 4})
        lines.append({"bench": "search_scale", "corpus": "synthetic", "docs": docs, "metric": "peak_rss_mb",
                      "ours": 1000.0, "baseline": 2000.0, "dense_index": "scan,bf16"})
    previous = tmp_path / "previous.jsonl"
    previous.write_text("".join(json.dumps(line) + "\n" for line in lines))
    search_scale.main(["--from_jsonl", str(previous), "--output_dir", str(tmp_path / "out")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["docs"], p["metric"], p.get("dense_candidates")) for p in printed if not p.get("extrapolated")] == [
        (300_000, "sec_per_query", dense_m), (300_000, "curve_sec_per_query", 1000), (300_000, "peak_rss_mb", None),
        (1_000_000, "sec_per_query", dense_m), (1_000_000, "curve_sec_per_query", 1000),
        (1_000_000, "peak_rss_mb", None)]
    msmarco = {p["metric"]: p for p in printed if p["corpus"] == "msmarco (extrapolated)"}
    assert msmarco["sec_per_query"]["dense_sec_per_query"] == pytest.approx(0.002 * 8.841823, abs=1e-6)


def test_a_previous_runs_hnsw_lines_are_relabeled_and_extrapolated(tmp_path, capsys):
    """`--from_jsonl` on HNSW lines (it read IVF's nprobe only, and raised KeyError): the default setting's lines
    become the figures, the others curve_ lines, and the two sizes are extrapolated to the large corpora."""
    from benchmarks import search_scale

    default, lines = search_scale.DEFAULT["hnsw"], []
    for docs, exact, ours, peak in ((300_000, 0.03, 0.003, (1500.0, 3000.0)), (1_000_000, 0.1, 0.004, (3800.0, 9200.0))):
        for m, cut, ef in (default, (1000, 32, 1000)):
            lines.append({"bench": "search_scale", "corpus": "synthetic", "docs": docs, "metric": "curve_sec_per_query",
                          "ours": ours, "baseline": exact, "candidates": m, "query_cut": cut, "efsearch": ef,
                          "dense_index": "HNSW32,SQ8", "dense_sec_per_query": ours / 2,
                          "sparse_sec_per_query": ours / 4, "rescore_sec_per_query": ours / 4})
        lines.append({"bench": "search_scale", "corpus": "synthetic", "docs": docs, "metric": "peak_rss_mb",
                      "ours": peak[0], "baseline": peak[1], "dense_index": "HNSW32,SQ8"})
    previous = tmp_path / "previous.jsonl"
    previous.write_text("".join(json.dumps(line) + "\n" for line in lines))
    search_scale.main(["--from_jsonl", str(previous), "--output_dir", str(tmp_path / "out")])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = [(p["docs"], p["metric"], p.get("candidates")) for p in printed if not p.get("extrapolated")]
    assert figures == [(300_000, "sec_per_query", 300), (300_000, "curve_sec_per_query", 1000),
                       (300_000, "peak_rss_mb", None), (1_000_000, "sec_per_query", 300),
                       (1_000_000, "curve_sec_per_query", 1000), (1_000_000, "peak_rss_mb", None)]
    msmarco = {p["metric"]: p for p in printed if p["corpus"] == "msmarco (extrapolated)"}
    assert msmarco["sec_per_query"]["baseline"] == pytest.approx(
        (0.03 * 3e5 + 0.1 * 1e6) / (3e5 ** 2 + 1e6 ** 2) * 8_841_823)  # exact: linear through the origin
    assert msmarco["sec_per_query"]["rescore_sec_per_query"] == pytest.approx(0.001)  # constant
    assert "| msmarco | 8,841,823 |" in (tmp_path / "out" / "extrapolation.md").read_text()
