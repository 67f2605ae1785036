"""evaluation: metrics by hand, data errors, exact search vs brute force, cache identity, shard merge, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.representation import Representation, score
from evaluation import encode as encode_mod
from evaluation import search as search_mod
from evaluation.config import EvalConfig
from evaluation.data import DatasetError, load_beir, resolve_dataset
from evaluation.encode import Encoded, token_budget_batches
from evaluation.metrics import evaluate, markdown_table
from evaluation.pipeline import run

WORDS = "protein cell gene cancer brain heart virus drug blood liver bone skin lung kidney muscle".split()


# ----------------------------------------------------------------------------------------------- fixtures
def write_beir(folder, docs, queries, qrels, split="test"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rows = "".join(f"{q}\t{d}\t{r}\n" for q, rel in qrels.items() for d, r in rel.items())
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return folder


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory):
    """40 documents and 6 queries of medical words; query q3 shares its id with a document (must be skipped)."""
    rng = np.random.default_rng(0)
    docs = [{"_id": f"d{i}", "title": f"{WORDS[i % 15]} study", "text": " ".join(rng.choice(WORDS, 5 + i % 30))}
            for i in range(40)]
    docs.append({"_id": "q3", "text": "heart heart heart"})
    queries = [{"_id": f"q{j}", "text": " ".join(rng.choice(WORDS, 3))} for j in range(6)]
    queries.append({"_id": "unjudged", "text": "not in the qrels"})
    qrels = {f"q{j}": {f"d{(7 * j) % 40}": 1, f"d{(7 * j + 3) % 40}": 2, f"d{(7 * j + 5) % 40}": 0} for j in range(6)}
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny", docs, queries, qrels)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_path):
    """A tiny BERT with an MLM head and the MiniLM tokenizer, as pre-training exports it."""
    from transformers import BertConfig, BertForMaskedLM

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tokenizer))
    out = tmp_path_factory.mktemp("tiny_model")
    BertForMaskedLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def config(tiny_model, tiny_beir, out, **kw):
    options = dict(representation="dupmae", dense_dim=16, sparse_top_k=8, max_length=24, max_tokens=64, offline=True)
    return EvalConfig(datasets=[str(tiny_beir)], output_dir=str(out), model_name_or_path=tiny_model, **{**options, **kw})


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_match_hand_computation():
    qrels = {"a": {"d1": 1, "d3": 2, "d9": 0}, "b": {"d2": 1}, "c": {"d5": 1}}
    ranking = {"a": {"d2": 0.9, "d1": 0.8, "d3": 0.7, "d4": 0.6, "d9": 0.5},
               "b": {f"x{i}": 1.0 - i / 100 for i in range(10)} | {"d2": 0.5}}  # d2 at rank 11; "c" not retrieved
    got = evaluate(qrels, ranking)
    log2 = math.log2
    dcg_a = {k: sum(g / log2(r + 2) for r, g in enumerate([0, 1, 2, 0, 0][:k])) for k in (1, 3, 5, 10, 100)}
    ideal_a = {k: sum(g / log2(r + 2) for r, g in enumerate([2, 1][:k])) for k in (1, 3, 5, 10, 100)}
    ndcg_b100 = 1 / log2(12)  # one relevant document at rank 11, ideal at rank 1
    expected = {
        "nDCG@1": 0.0, "nDCG@3": dcg_a[3] / ideal_a[3] / 3, "nDCG@5": dcg_a[5] / ideal_a[5] / 3,
        "nDCG@10": dcg_a[10] / ideal_a[10] / 3, "nDCG@100": (dcg_a[100] / ideal_a[100] + ndcg_b100) / 3,
        "MRR@10": (1 / 2) / 3,  # b's hit is below rank 10
        "Recall@10": 1.0 / 3, "Recall@100": 2.0 / 3, "Recall@1000": 2.0 / 3,
        "MAP@1000": ((1 / 2 + 2 / 3) / 2 + 1 / 11) / 3,
    }
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-4), name
    assert "| a |" not in markdown_table({"x": got}) and "| x | 0.0000 |" in markdown_table({"x": got})


# --------------------------------------------------------------------------------------------------- data
def test_beir_conventions(tiny_beir):
    data = load_beir(tiny_beir, "test")
    assert data.doc_texts[0].startswith(f"{WORDS[0]} study ") and data.doc_texts[-1] == "heart heart heart"
    assert data.query_ids == [f"q{j}" for j in range(6)]  # "unjudged" has no qrels: not evaluated
    assert data.qrels["q1"] == {"d7": 1, "d10": 2, "d12": 0}


@pytest.mark.parametrize("file,line,content,message", [
    ("corpus.jsonl", 2, "{not json", "not valid JSON"),
    ("corpus.jsonl", 3, '{"title": "t", "text": "x"}', "'_id' is missing"),
    ("queries.jsonl", 1, '["a list"]', "expected a JSON object"),
    ("qrels/test.tsv", 2, "q0\td0", "expected 3 tab-separated fields"),
    ("qrels/test.tsv", 3, "q0\td0\thigh", "not an integer"),
])
def test_malformed_lines_name_file_and_line(tmp_path, file, line, content, message):
    folder = write_beir(tmp_path / "bad", [{"_id": f"d{i}", "text": "t"} for i in range(3)],
                        [{"_id": "q0", "text": "q"}], {"q0": {"d0": 1, "d1": 1}})
    lines = (folder / file).read_text().splitlines()
    lines[line - 1] = content
    (folder / file).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{file}:{line}: .*{message}"):
        load_beir(folder, "test")


def test_bare_name_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError, match=rf"nfcorpus.zip.*{tmp_path / 'nfcorpus'}"):
        resolve_dataset("nfcorpus", tmp_path, allow_download=False)
    write_beir(tmp_path / "nfcorpus", [{"_id": "d", "text": "t"}], [{"_id": "q", "text": "q"}], {"q": {"d": 1}})
    assert resolve_dataset("nfcorpus", tmp_path, allow_download=False) == tmp_path / "nfcorpus"
    with pytest.raises(DatasetError, match="not a BEIR folder"):
        resolve_dataset(str(tmp_path / "missing" / "x"), tmp_path, allow_download=False)


@pytest.mark.parametrize("flock", [True, False])
def test_shard_tasks_asking_for_one_dataset_at_once_download_it_once(tmp_path, flock):
    """Two processes resolve one bare BEIR name at the same time, from a server on 127.0.0.1 that holds the zip's
    second half back until both are in: one downloads, the other waits for it (before, both wrote one .part and
    extracted over each other: one crashed); the folder appears only whole, and nothing else is left behind.
    Where flock fails (a filesystem without it across nodes) both download, each into its own names, and the
    first rename wins."""
    import http.server
    import subprocess
    import sys
    import threading
    import time
    import zipfile

    source = write_beir(tmp_path / "src" / "tiny", [{"_id": f"d{i}", "text": f"t {i}"} for i in range(50)],
                        [{"_id": "q", "text": "q"}], {"q": {"d1": 1}})
    with zipfile.ZipFile(tmp_path / "tiny.zip", "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent))
    payload, gets, release = (tmp_path / "tiny.zip").read_bytes(), [], threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            release.wait(60)
            self.wfile.write(payload[len(payload) // 2:])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data_dir = tmp_path / "data"
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); from evaluation import data; "
            + ("" if flock else "data.fcntl.flock = lambda *a: (_ for _ in ()).throw(OSError(37, 'No locks')); ")
            + f"data.BEIR_URL = 'http://127.0.0.1:{server.server_address[1]}/{{name}}.zip'; "
            f"print(data.resolve_dataset('tiny', {str(data_dir)!r}, allow_download=True))")
    logs = [tmp_path / f"task{i}.log" for i in range(2)]
    tasks = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
             for log in logs]
    try:
        deadline = time.monotonic() + 60
        while not (len(gets) == 2 or gets and any("waiting for another task" in log.read_text() for log in logs)):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.05)
        assert not (data_dir / "tiny").exists()  # half a zip in: nothing to read yet
        release.set()
        outputs = [task.communicate(timeout=60)[0].strip() for task in tasks]
    finally:
        release.set()
        server.shutdown()
    assert [task.returncode for task in tasks] == [0, 0], [log.read_text() for log in logs]
    assert outputs == [str(data_dir / "tiny")] * 2 and gets == ["/tiny.zip"] * (1 if flock else 2)
    assert {p.name: p.read_bytes() for p in (data_dir / "tiny").rglob("*") if p.is_file()} == {
        p.name: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    assert sorted(p.name for p in data_dir.iterdir()) == [".tiny.download.lock", "tiny"]


# ------------------------------------------------------------------------------------------------- search
def random_encoded(n, prefix, g, vocab=50, k=None):
    dense = torch.randn(n, 8, generator=g)
    full = torch.randn(n, vocab, generator=g)
    ids = [f"{prefix}{i}" for i in range(n)]
    if k is None:
        return Encoded(ids, dense.numpy(), vocab=full.numpy()), full
    values, indices = torch.topk(full, k, dim=1)
    return Encoded(ids, dense.numpy(), indices.int().numpy(), values.numpy()), full


def test_dupmae_search_equals_dense_recomputation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    queries, q_vocab = random_encoded(5, "q", g)
    corpus, d_vocab = random_encoded(37, "d", g, k=6)
    monkeypatch.setattr(search_mod, "DOC_CHUNK", 10)  # several corpus chunks and their top-k merge
    monkeypatch.setattr(search_mod, "QUERY_BATCH", 2)
    scores, rows = search_mod.dupmae_search(queries, corpus, depth=7)
    reference = score(Representation(torch.from_numpy(queries.dense), q_vocab),
                      Representation(torch.from_numpy(corpus.dense), d_vocab), top_k=6)  # [5, 37]
    ref_scores, ref_rows = torch.topk(reference, 7, dim=1)
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-5, atol=1e-5)
    assert (rows == ref_rows.numpy()).all()


def test_dense_search_is_exact_and_skips_own_id():
    g = torch.Generator().manual_seed(1)
    queries, _ = random_encoded(4, "d", g)  # query ids d0..d3 equal document ids
    corpus, _ = random_encoded(30, "d", g)
    corpus.dense[:4] = queries.dense * 10  # each query's own document would be its best hit
    ranking = search_mod.search(Encoded(queries.ids, queries.dense), Encoded(corpus.ids, corpus.dense), depth=5)
    brute = queries.dense @ corpus.dense.T
    for q, qid in enumerate(queries.ids):
        expected = [corpus.ids[r] for r in np.argsort(-brute[q]) if corpus.ids[r] != qid][:5]
        assert list(ranking[qid]) == expected
        assert list(ranking[qid].values()) == pytest.approx(sorted(brute[q][[int(e[1:]) for e in expected]])[::-1],
                                                            rel=1e-5)


# ------------------------------------------------------------------------------------------------- encode
def test_token_budget_batches_cover_every_row_longest_first():
    lengths = np.array([5, 60, 17, 60, 3, 9, 33, 1, 8])
    batches = token_budget_batches(lengths, max_tokens=70, batch_size=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    flat = np.concatenate(batches)
    assert (np.diff(lengths[flat]) <= 0).all()
    for b in batches:
        assert len(b) <= 4 and (len(b) == 1 or len(b) * lengths[b].max() <= 70)


def test_batched_encoding_equals_one_text_at_a_time(tiny_model):
    from common.representation import Encoder, RepresentationConfig
    from common.tokenizer import load_tokenizer

    enc = Encoder.from_pretrained(tiny_model, RepresentationConfig(kind="dupmae", dense_dim=16, top_k=8)).eval()
    tok = load_tokenizer(tiny_model)
    texts = ["", "one", "a much longer text about the heart and the brain and a virus", "gene drug"]
    kw = dict(max_length=16, max_tokens=32, batch_size=8)
    batched = encode_mod.encode_texts(enc, tok, list("abcd"), texts, documents=False, **kw)
    docs = encode_mod.encode_texts(enc, tok, list("abcd"), texts, documents=True, **kw)
    for i, text in enumerate(texts):
        single = encode_mod.encode_texts(enc, tok, ["x"], [text], documents=False, **kw)
        np.testing.assert_allclose(batched.dense[i], single.dense[0], atol=1e-5)
        np.testing.assert_allclose(batched.vocab[i], single.vocab[0], atol=1e-4)
        top = np.sort(single.vocab[0])[::-1][:8]
        np.testing.assert_allclose(docs.sparse_values[i], top, atol=1e-4)
    assert docs.vocab is None and batched.sparse_indices is None


# ------------------------------------------------------------------------------------------- end to end
def test_end_to_end_outputs_and_cache_identity(tiny_model, tiny_beir, tmp_path, monkeypatch):
    results = run(config(tiny_model, tiny_beir, tmp_path))
    assert set(results) == {"tiny"} and 0 <= results["tiny"]["nDCG@10"] <= 1
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "results.md").read_text().startswith("| dataset | nDCG@1 |")
    run_lines = (tmp_path / "tiny.run").read_text().splitlines()
    assert len(run_lines) == 6 * 41 - 1  # depth 1000 > corpus: every document, but q3 is not in q3's list
    assert not any(line.split()[0] == line.split()[2] for line in run_lines)
    first = run_lines[0].split()
    assert first[1] == "Q0" and first[3] == "1"

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached run must not encode")

    monkeypatch.setattr("evaluation.pipeline.encode_texts", no_encoding)
    again = tmp_path / "again"
    assert run(config(tiny_model, tiny_beir, again, cache_dir=str(tmp_path / "cache"))) == results
    assert (again / "tiny.run").read_text() == (tmp_path / "tiny.run").read_text()
    with pytest.raises(AssertionError, match="must not encode"):  # another max length is another cache entry
        run(config(tiny_model, tiny_beir, again, cache_dir=str(tmp_path / "cache"), max_length=20))


def test_sharded_encoding_merges_to_the_unsharded_result(tiny_model, tiny_beir, tmp_path):
    whole = run(config(tiny_model, tiny_beir, tmp_path / "whole", representation="mean", normalize=True))
    sharded = tmp_path / "sharded"
    for shard in (2, 0):  # shard 1 is left for the merging run to encode itself
        assert run(config(tiny_model, tiny_beir, sharded, representation="mean", normalize=True,
                          num_shards=3, shard_index=shard)) is None
    assert not (sharded / "results.json").exists()
    merged = run(config(tiny_model, tiny_beir, sharded, representation="mean", normalize=True, num_shards=3))
    assert merged["tiny"] == pytest.approx(whole["tiny"])
    rankings = [[line.split()[:3] for line in (d / "tiny.run").read_text().splitlines()] for d in
                (tmp_path / "whole", sharded)]
    assert rankings[0] == rankings[1]


def test_more_shards_than_documents_skips_the_empty_shards(tiny_model, tiny_beir, tmp_path):
    """--num_shards above the corpus size leaves shards empty: they are skipped, not searched (the exact search
    raised AttributeError and Seismic AssertionError on them); an empty corpus is one line naming the file."""
    docs = [{"_id": f"d{i}", "text": " ".join(WORDS[i:i + 4])} for i in range(5)]
    five = write_beir(tmp_path / "five", docs, [{"_id": "q", "text": "heart study"}], {"q": {"d1": 1}})
    whole = run(config(tiny_model, five, tmp_path / "whole", sparse_index="exact"))

    def ranks(out):
        return [line.split()[:4] for line in (out / "five.run").read_text().splitlines()]

    for method in ("exact", "seismic"):
        out = tmp_path / method
        assert run(config(tiny_model, five, out, sparse_index=method, num_shards=8)) == whole
        assert ranks(out) == ranks(tmp_path / "whole")  # scores equal to float32 rounding
    empty = write_beir(tmp_path / "empty", [], [{"_id": "q", "text": "heart"}], {"q": {"d": 1}})
    with pytest.raises(DatasetError, match=r"empty/corpus.jsonl: no documents"):
        run(config(tiny_model, empty, tmp_path / "out"))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="shard_index"):
        EvalConfig(datasets=["x"], output_dir=str(tmp_path), num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="no_cache"):
        EvalConfig(datasets=["x"], output_dir=str(tmp_path), num_shards=2, shard_index=0, no_cache=True)
    with pytest.raises(ValueError, match="top_k"):
        EvalConfig(datasets=["x"], output_dir=str(tmp_path), sparse_top_k=0)


def test_cli_parses_hf_style_flags_and_reports_missing_data(tiny_model, tiny_beir, tmp_path):
    from evaluation.beir import main

    results = main(["--model", tiny_model, "--datasets", str(tiny_beir), "--output_dir", str(tmp_path),
                    "--representation", "cls", "--normalize", "false", "--max_seq_length", "16", "--depth", "5",
                    "--no_cache", "true", "--offline", "true"])
    assert not (tmp_path / "cache").exists()
    assert len((tmp_path / "tiny.run").read_text().splitlines()) == 6 * 5
    assert set(results["tiny"]) >= {"nDCG@10", "MRR@10", "Recall@1000", "MAP@1000"}
    with pytest.raises(SystemExit, match="scifact.*downloads are off"):
        main(["--datasets", "scifact", "--output_dir", str(tmp_path), "--data_dir", str(tmp_path / "none"),
              "--offline", "true"])


def test_concat_skips_empty_shards():
    part = Encoded(["a", "b"], np.ones((2, 3), np.float32))
    empty = Encoded([], np.zeros((0, 0), np.float32))
    merged = Encoded.concat([empty, part, empty])
    assert merged.ids == ["a", "b"] and merged.dense.shape == (2, 3)


def test_bf16_autocast_stays_close_to_fp32(tiny_model, caplog):
    from common.representation import Encoder, RepresentationConfig
    from common.tokenizer import load_tokenizer

    enc = Encoder.from_pretrained(tiny_model, RepresentationConfig(kind="mean", normalize=True)).eval()
    tok = load_tokenizer(tiny_model)
    texts = ["gene drug", "the heart and the brain", "virus"]
    kw = dict(documents=True, max_length=16, max_tokens=64, batch_size=8)
    fp32 = encode_mod.encode_texts(enc, tok, list("abc"), texts, **kw)
    bf16 = encode_mod.encode_texts(enc, tok, list("abc"), texts, bf16=True, **kw)
    assert bf16.dense.dtype == np.float32
    assert (fp32.dense * bf16.dense).sum(1).min() > 0.99  # unit vectors: cosine similarity
    native = encode_mod.native_bf16(torch.device("cpu"))
    assert ("no native bf16" in caplog.text) == (not native)


def test_index_factory_plumbing():
    g = torch.Generator().manual_seed(2)
    queries, _ = random_encoded(3, "q", g)
    corpus, _ = random_encoded(50, "d", g)
    exact = search_mod.search(Encoded(queries.ids, queries.dense), Encoded(corpus.ids, corpus.dense), depth=4)
    flat = search_mod.search(Encoded(queries.ids, queries.dense), Encoded(corpus.ids, corpus.dense), depth=4,
                             index_factory="Flat")
    hnsw = search_mod.search(Encoded(queries.ids, queries.dense), Encoded(corpus.ids, corpus.dense), depth=4,
                             index_factory="HNSW16")
    for qid in queries.ids:
        assert list(flat[qid]) == list(exact[qid]) and list(flat[qid].values()) == pytest.approx(list(exact[qid].values()))
        assert len(hnsw[qid]) == 4
    sparse, _ = random_encoded(50, "d", g, k=5)
    with pytest.raises(ValueError, match="dense search only"):
        search_mod.search(random_encoded(3, "q", g)[0], sparse, depth=4, index_factory="Flat")


@pytest.mark.parametrize("options", [dict(representation="mean", normalize=True),
                                     dict(sparse_index="seismic", candidates=7, depth=5)])
def test_a_stale_cache_entry_is_replaced_and_its_hits_are_not_reused(tiny_model, tmp_path, caplog, monkeypatch,
                                                                    options):
    """Two corpus lines swapped, size and mtime kept: the embedding entry's key is the same but its ids are not.
    The cached run must equal a fresh one (no hits or Seismic index of the old row order), and the stale entry
    is replaced, so a third run reads it from the cache. Hits recorded for other ids are refused."""
    import os

    docs = [{"_id": f"d{i}", "text": " ".join(WORDS[i:i + 3 + i % 3])} for i in range(7)]
    queries = [{"_id": f"q{j}", "text": " ".join(WORDS[2 * j:2 * j + 2])} for j in range(3)]
    qrels = {f"q{j}": {f"d{2 * j}": 1, f"d{j + 1}": 1} for j in range(3)}
    folder = write_beir(tmp_path / "seven", docs, queries, qrels)
    cache_dir = str(tmp_path / "cache")
    first = run(config(tiny_model, folder, tmp_path / "first", cache_dir=cache_dir, **options))
    corpus = folder / "corpus.jsonl"
    stat = corpus.stat()
    lines = corpus.read_text().splitlines(keepends=True)
    lines[1], lines[5] = lines[5], lines[1]
    corpus.write_text("".join(lines))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh = run(config(tiny_model, folder, tmp_path / "fresh", no_cache=True, **options))
    cached = run(config(tiny_model, folder, tmp_path / "cached", cache_dir=cache_dir, **options))
    assert cached == fresh and first["seven"] == pytest.approx(fresh["seven"])  # the same documents and metrics
    assert (tmp_path / "cached" / "seven.run").read_text() == (tmp_path / "fresh" / "seven.run").read_text()
    def no_encoding(*args, **kwargs):
        raise AssertionError("the replaced entry must be read from the cache")

    monkeypatch.setattr("evaluation.pipeline.encode_texts", no_encoding)
    for hits in (tmp_path / "cache").glob("*.hits"):
        (hits / "searched_for.json").write_text(json.dumps({"shard_ids": "other", "query_ids": "other"}))
    with caplog.at_level("WARNING", logger="evaluation.pipeline"):
        again = run(config(tiny_model, folder, tmp_path / "again", cache_dir=cache_dir, **options))
    assert "refused, searched for other ids" in caplog.text
    assert again == fresh and (tmp_path / "again" / "seven.run").read_text() == (tmp_path / "fresh" / "seven.run").read_text()


def test_ids_are_hashed_for_the_hits_cache_only_and_the_queries_once(tiny_model, tiny_beir, tmp_path, monkeypatch):
    """The searched_for check hashed every shard's ids, and the queries' again per shard, on every search, the
    hits cache off too: now each shard's ids once where its hits are cached, the query ids once a search."""
    from evaluation import cache

    hashed = []
    digest = cache.content_digest

    def counting(ids, arrays):
        if not arrays:  # an ids-only digest: the searched_for check's
            hashed.append(tuple(ids))
        return digest(ids, arrays)

    monkeypatch.setattr(cache, "content_digest", counting)
    fresh = run(config(tiny_model, tiny_beir, tmp_path / "fresh", no_cache=True, num_shards=3))
    assert hashed == []
    cached = run(config(tiny_model, tiny_beir, tmp_path / "cached", cache_dir=str(tmp_path / "cache"), num_shards=3))
    data = load_beir(tiny_beir, "test")
    n = len(data.doc_ids)
    shards = [tuple(data.doc_ids[s * n // 3:(s + 1) * n // 3]) for s in range(3)]
    assert sorted(hashed) == sorted([tuple(data.query_ids), *shards])
    hashed.clear()
    again = run(config(tiny_model, tiny_beir, tmp_path / "again", cache_dir=str(tmp_path / "cache"), num_shards=3))
    assert sorted(hashed) == sorted([tuple(data.query_ids), *shards])  # read back: checked once each
    assert len(list((tmp_path / "cache").glob("*.hits"))) == 3 and fresh == cached == again


def test_a_hub_name_is_fingerprinted_by_its_cached_revision_and_blobs(tmp_path, monkeypatch):
    """A new revision under the same hub name (or new weights) is another cache key; only the name was before."""
    import huggingface_hub.constants

    from evaluation.cache import fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--tiny"

    def snapshot(commit, blob):
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_text("{}")
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").symlink_to(repo / "blobs" / blob)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    snapshot("c1" * 20, "b1" * 32)
    first = fingerprint("org/tiny")
    assert first == {"name": "org/tiny", "revision": "c1" * 20, "files": [["config.json", "b1" * 32]]}
    snapshot("c2" * 20, "b2" * 32)
    assert fingerprint("org/tiny")["revision"] == "c2" * 20 and fingerprint("org/tiny") != first
    assert fingerprint("org/not-cached") == {"name": "org/not-cached", "revision": None}


def test_content_digest_tells_entries_apart_by_ids_order_and_arrays(tmp_path):
    """The digest the search hits are keyed on, alone: two entries with the same arrays and reordered ids, or the
    same ids and one value changed, differ; an equal entry written again, or one read back (with digest.json or,
    as before it was recorded, without), has the digest it was saved with."""
    from evaluation import cache

    g = np.random.default_rng(0)
    ids = ["d3", "d10", "d7", "d1"]  # not in order, not contiguous
    dense = g.normal(size=(4, 5)).astype(np.float32)
    indices, values = g.integers(0, 90, (4, 3)).astype(np.int32), g.random((4, 3)).astype(np.float32)
    a = Encoded(list(ids), dense, indices, values)
    swapped = Encoded([ids[1], ids[0]] + ids[2:], dense, indices, values)  # rows unchanged, ids reordered
    changed = Encoded(list(ids), dense, indices, values.copy())
    changed.sparse_values[2, 1] += 1e-6
    cache.save(tmp_path, "a", a, {})
    cache.save(tmp_path, "swapped", swapped, {})
    cache.save(tmp_path, "changed", changed, {})
    assert len({a.digest, swapped.digest, changed.digest}) == 3
    again = Encoded(list(ids), dense.copy(), indices.copy(), values.copy())
    cache.save(tmp_path, "again", again, {})
    assert again.digest == a.digest and again.source == str(tmp_path / "again")
    assert cache.load(tmp_path, "a").digest == a.digest
    (tmp_path / "swapped" / "digest.json").unlink()  # an entry written before the digest was recorded
    assert cache.load(tmp_path, "swapped").digest == swapped.digest
    # hashed once: recorded beside the entry, whole, and read from there by the next load
    assert json.loads((tmp_path / "swapped" / "digest.json").read_text()) == swapped.digest
    assert sorted(p.name for p in (tmp_path / "swapped").iterdir()) == [
        "dense.npy", "digest.json", "ids.json", "key.json", "sparse_indices.npy", "sparse_values.npy"]


def test_a_read_only_entry_without_digest_is_hashed_on_each_load(tmp_path, monkeypatch, caplog):
    from evaluation import cache

    entry = Encoded(["a", "b"], np.eye(2, dtype=np.float32))
    cache.save(tmp_path, "e", entry, {})
    (tmp_path / "e" / "digest.json").unlink()
    hashed = []
    monkeypatch.setattr(cache, "content_digest", lambda *a: hashed.append(1) or entry.digest)
    monkeypatch.setattr(cache.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    with caplog.at_level("INFO", logger="evaluation.cache"):
        assert [cache.load(tmp_path, "e").digest for _ in range(2)] == [entry.digest] * 2
    assert len(hashed) == 2 and "digest not recorded" in caplog.text
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["dense.npy", "ids.json", "key.json"]
