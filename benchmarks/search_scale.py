"""Search at scale (issue 29): the dupmae representation searched exactly against the indexed search (Seismic's
sparse candidates + faiss's dense ones, their union rescored), per query, in memory and in quality (issue 36).

    python benchmarks/search_scale.py --output_dir runs/search_scale [--sizes 100000 300000 1000000] [--smoke]

Corpora: the real sets at hand (../shared/data/scifact, the offline docstring set), encoded by the packaged MiniLM
with the dupmae representation (the project's offline default model), and synthetic corpora of --sizes documents
drawn from those real encodings: each synthetic document mixes two real ones (the union of their kept vocabulary
entries, values jittered by a log-normal factor, its top k kept; dense = a random convex mix plus noise, L2
normalized), so vocabulary ids, values and their co-occurrence follow real documents, not a uniform draw. Queries:
SciFact's real test queries (whole vocabulary vectors). Corpora are written as memory-mapped cache entries.
Each method runs in a subprocess of its own (peak RSS = that process's own VmHWM, `common.memory`): exact
(`dupmae_search`) and indexed (`--sparse_index seismic`: dense candidates from `--dense_index` scan (the
RowStore's scan of bfloat16 dense halves, no faiss index), hnsw (faiss HNSW32,SQ8) and/or ivf (IVF√N,SQ8); at
DEFAULT and along CURVE, the candidates M, the query cut and the scan's dense candidates or faiss's efSearch or
nprobe; the union rescored from an in-memory float16 copy of the rows, `RowStore`). The faiss and Seismic builds
run and are timed apart, each in a process of its own (Seismic's cached beside the corpus). Each synthetic size is
measured twice: `synthetic` at the model's sparse weight and `synthetic-sparse` at SPARSE_HEAVY_WEIGHT; every
line carries `sparse_share`, the share of the exact top-10's scores the sparse half carries. `--from_jsonl
RUN.jsonl` prints a previous run's lines again under DEFAULT and extrapolates them. Prints one JSON line per
figure: sec_per_query, peak_rss_mb, recall@10_of_exact, recall@100_of_exact (ours: indexed, baseline: exact), ndcg@10 on the real sets;
"curve" lines for the other settings; and lines extrapolated to MS MARCO and the large BEIR corpora from the
measured growth, written as a table to OUTPUT_DIR/extrapolation.md too.
--smoke: a tiny random-init model on the 16-document smoke folder and a 3,000-document synthetic corpus.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import smoke  # noqa: E402
from common.memory import peak_rss_bytes  # noqa: E402
from evaluation import cache  # noqa: E402
from evaluation.search import (RowStore, SearchOptions, dupmae_search, faiss_index,  # noqa: E402
                               indexed_dupmae_search)
from evaluation.sparse_index import SeismicConfig, index_record, load_or_build  # noqa: E402

BENCH = "search_scale"
SHARED = REPO.parent / "shared" / "data"
DEPTH = 100
#: The dense candidates' source (--dense_index) and the parameter its curve varies: the scan's number of dense
#: candidates (SearchOptions.dense_candidates), faiss's efSearch or nprobe.
DENSE_PARAM = {"scan": "dense_candidates", "hnsw": "efSearch", "ivf": "nprobe"}
#: (candidates M, query_cut, nprobe or efSearch) along the trade-off curve; DEFAULT is where it sits by default.
CURVE = {"scan": [(300, 32, 300), (300, 32, 600), (300, 32, 800), (300, 32, 1000), (1000, 32, 1000)],
         "ivf": [(100, 32, 64), (300, 16, 64), (300, 32, 16), (300, 32, 64), (300, 32, 256), (1000, 32, 64)],
         "hnsw": [(100, 32, 128), (300, 16, 384), (300, 32, 300), (300, 32, 384), (300, 32, 768), (1000, 32, 1000)]}
DEFAULT = {"scan": (SearchOptions().candidates, SearchOptions().query_cut, 800),
           "ivf": (SearchOptions().candidates, SearchOptions().query_cut, 256),
           "hnsw": (SearchOptions().candidates, SearchOptions().query_cut, 384)}
#: synthetic-sparse: the synthetic corpus scored at this sparse weight, so the sparse half moves the ranking and
#: Seismic's recall is tested (the model's own weight, 0.2 for the packaged MiniLM, leaves it to the dense half).
SPARSE_HEAVY_WEIGHT = 1.0
#: Large corpora the extrapolation names (documents; MS MARCO passages, BEIR's largest).
LARGE = {"msmarco": 8_841_823, "climate-fever/fever": 5_416_568, "hotpotqa": 5_233_329, "dbpedia-entity": 4_635_922,
         "nq": 2_681_468}


def rss_mb() -> float:
    return peak_rss_bytes() / 2**20


PRINTED: list[dict] = []  # every line printed, for the extrapolation


def line(corpus: str, docs: int, metric: str, ours: float, baseline: float, better: str, unit: str, smoke_run: bool,
         **extra) -> None:
    PRINTED.append({"bench": BENCH, "corpus": corpus, "docs": docs, "metric": metric, "unit": unit,
                    "ours": round(ours, 6), "baseline": round(baseline, 6),
                    "ratio": round(ours / baseline, 6) if baseline else None, "better": better, **extra,
                    **({"smoke": True} if smoke_run else {})})
    print(json.dumps(PRINTED[-1]), flush=True)


# ------------------------------------------------------------------------------------------------ the corpora
def real_sets(args) -> list[tuple[str, Path, Path, object]]:
    """(name, corpus entry, query entry, BEIR data) of each real set, encoded with dupmae into the cache."""
    from evaluation.config import EvalConfig
    from evaluation.data import load_beir
    from evaluation.pipeline import Evaluator

    out = Path(args.output_dir)
    if args.smoke:
        folders = [smoke.tiny_beir(out / "data" / "smoke")]
        model = str(smoke.tiny_bert(out / "tiny_bert"))
    else:
        docstrings = out / "data" / "docstrings"
        if not (docstrings / "corpus.jsonl").is_file():  # the offline docstring set (the demo's builder)
            subprocess.run([sys.executable, "-m", "demo.docstring_corpus", str(docstrings)], cwd=REPO, check=True)
        folders = [f for f in (SHARED / "scifact", docstrings) if (f / "corpus.jsonl").is_file()]
        model = args.model
    cfg = EvalConfig(datasets=[str(f) for f in folders], output_dir=str(out), model_name_or_path=model,
                     representation="dupmae", cache_dir=args.cache_dir or str(out / "cache"), offline=True)
    evaluator = Evaluator(cfg)
    sets = []
    for folder in folders:
        data = load_beir(folder, "test")
        (corpus,) = evaluator.encode_corpus_shards(data)
        queries = evaluator.encode_queries(data)
        sets.append((folder.name, Path(corpus.source), Path(queries.source), data))
    return sets, evaluator.encoder.config.sparse_weight


def synthesize(bases: list[Path], n: int, out: Path, seed: int = 0, chunk: int = 20000) -> Path:
    """A cache entry of n synthetic documents, each two real documents mixed (see the module docstring); one
    already at `out` is reused only when it was built from the same real entries (their content digests: a base
    replaced in place keeps its folder name, not its digest), size and seed. Its digest.json is written with it, so
    no worker hashes it on load."""
    base = [cache.load(b.parent, b.name) for b in bases]  # memory-mapped; each digest read from its digest.json
    built_from = {"synthetic": n, "bases": [b.digest for b in base], "seed": seed}
    if (out / "ids.json").is_file():
        if (out / "key.json").is_file() and json.loads((out / "key.json").read_text()) == built_from:
            return out
        print(f"{out}: built from other real sets or another model; building it again", file=sys.stderr)
        shutil.rmtree(out)
    idx = np.concatenate([np.asarray(b.sparse_indices) for b in base])  # [B, k]
    val = np.concatenate([np.asarray(b.sparse_values) for b in base])
    dense = np.concatenate([np.asarray(b.dense) for b in base])
    k, g = idx.shape[1], np.random.default_rng(seed)
    tmp = cache.temporary(out)
    tmp.mkdir(parents=True)
    arrays = {"dense": np.lib.format.open_memmap(tmp / "dense.npy", "w+", np.float32, (n, dense.shape[1])),
              "sparse_indices": np.lib.format.open_memmap(tmp / "sparse_indices.npy", "w+", np.int32, (n, k)),
              "sparse_values": np.lib.format.open_memmap(tmp / "sparse_values.npy", "w+", np.float32, (n, k))}
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        a, b = g.integers(0, len(idx), m), g.integers(0, len(idx), m)
        ids = np.concatenate([idx[a], idx[b]], 1)  # [m, 2k]
        vals = np.concatenate([val[a], val[b]], 1) * g.lognormal(0.0, 0.3, (m, 2 * k)).astype(np.float32)
        order = np.argsort(-vals, 1, kind="stable")  # by value, then stably by id: a repeated id's first is its max
        ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
        order = np.argsort(ids, 1, kind="stable")
        ids, vals = np.take_along_axis(ids, order, 1), np.take_along_axis(vals, order, 1)
        vals[:, 1:][ids[:, 1:] == ids[:, :-1]] = -np.inf
        top = np.argpartition(-vals, k - 1, 1)[:, :k]
        arrays["sparse_indices"][start:start + m] = np.take_along_axis(ids, top, 1)
        arrays["sparse_values"][start:start + m] = np.maximum(np.take_along_axis(vals, top, 1), 0)
        w = g.uniform(0.3, 0.7, (m, 1)).astype(np.float32)
        mix = w * dense[a] + (1 - w) * dense[b] + g.normal(0, 0.05, (m, dense.shape[1])).astype(np.float32)
        arrays["dense"][start:start + m] = mix / np.linalg.norm(mix, axis=1, keepdims=True)
    for array in arrays.values():
        array.flush()
    ids = [f"s{i}" for i in range(n)]
    (tmp / "ids.json").write_text(json.dumps(ids))
    (tmp / "key.json").write_text(json.dumps(built_from))
    cache.record_digest(tmp / "digest.json", cache.content_digest(ids, arrays))  # what cache.load would compute
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------------ the workers
def worker(args) -> None:
    """One method on one corpus, in this process: prints a JSON dict of timings and peak RSS, saves the rows."""
    corpus = cache.load(args.corpus.parent, args.corpus.name)
    queries = cache.load(args.queries.parent, args.queries.name)
    queries.vocab = np.asarray(queries.vocab)  # [Q, V]: small, read once
    result = {"docs": len(corpus.ids), "queries": len(queries.ids)}
    config = SeismicConfig()
    built_from = json.loads((args.corpus / "key.json").read_text())  # a synthetic corpus's bases, or a real entry's key
    # keyed on the corpus's content digest, as evaluation.pipeline keys it (an entry replaced in place keeps its
    # folder name): a real entry's record is the pipeline's (its key names the model), so either reuses the other's
    record = index_record(corpus.digest, built_from.get("model", {"corpus_built_from": built_from}),
                          corpus.sparse_indices.shape[1], len(corpus.ids), config)
    index_folder = args.corpus.with_name(args.corpus.name + ".seismic")
    if args.worker == "exact":
        start = time.perf_counter()
        _, rows = dupmae_search(queries, corpus, DEPTH, args.sparse_weight)
        result["seconds"] = time.perf_counter() - start
        np.save(args.rows, rows)
    elif args.worker == "build":  # the Seismic index, once per corpus (cached beside it)
        start = time.perf_counter()
        load_or_build(index_folder, record, corpus.sparse_indices, corpus.sparse_values, config)
        result["seconds"] = time.perf_counter() - start
    elif args.worker == "dense_build":  # the faiss index, written to ROWS (its build time and memory apart)
        start = time.perf_counter()
        faiss.write_index(faiss_index(corpus.dense, dense_factory(len(corpus.ids), args.dense_index)), str(args.rows))
        result["seconds"] = time.perf_counter() - start
    else:
        index = load_or_build(index_folder, record, corpus.sparse_indices, corpus.sparse_values, config)
        dense = None if args.dense_index == "scan" else faiss.read_index(f"{args.rows}.faiss")
        start = time.perf_counter()
        store = RowStore(corpus, queries.vocab.shape[1], scan=dense is None)
        result["store_seconds"] = time.perf_counter() - start
        result["settings"] = {}
        for m, cut, value in CURVE[args.dense_index] if args.curve else [DEFAULT[args.dense_index]]:
            used = min(value, dense.nlist) if args.dense_index == "ivf" else value  # nprobe: at most all lists
            if dense is None:
                options = SearchOptions("seismic", candidates=m, dense_candidates=used, query_cut=cut)
            else:
                options = SearchOptions("seismic", candidates=m, query_cut=cut,
                                        faiss_params=f"{DENSE_PARAM[args.dense_index]}={used}")
                faiss.ParameterSpace().set_index_parameters(dense, options.faiss_params)
            timings: dict[str, float] = {}
            start = time.perf_counter()
            _, rows = indexed_dupmae_search(queries, corpus, DEPTH, args.sparse_weight, index, options,
                                            timings=timings, dense_index=dense, store=store)
            result["settings"][f"{m},{cut},{value}"] = {"seconds": time.perf_counter() - start, "used": used,
                                                         **timings}
            np.save(f"{args.rows}.{m}-{cut}-{value}.npy", rows)
    result["peak_rss_mb"] = rss_mb()
    print(json.dumps(result), flush=True)


def dense_factory(n: int, kind: str) -> str:
    """The dense candidates' faiss index over 8-bit scalar codes (the candidates are rescored, so the index may be
    approximate and small): hnsw, a graph of 32 links a node; ivf, about sqrt(N) inverted lists; "scan,bf16" names
    the RowStore's scan, which has no index."""
    return {"scan": "scan,bf16", "hnsw": "HNSW32,SQ8"}.get(kind, f"IVF{max(1, int(np.sqrt(n)))},SQ8")


def run_worker(method: str, corpus: Path, queries: Path, rows: Path, sparse_weight: float, curve: bool,
               dense_index: str = "hnsw") -> dict:
    command = [sys.executable, __file__, "--worker", method, "--corpus", str(corpus), "--queries", str(queries),
               "--rows", str(rows), "--sparse_weight", str(sparse_weight), "--dense_index", dense_index] + (
        ["--curve"] if curve else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        sys.exit(f"{method} worker on {corpus} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ measuring
def recall_of_exact(rows: np.ndarray, exact: np.ndarray, depth: int) -> float:
    return float(np.mean([len(set(r[:depth]) & set(e[:depth])) / depth for r, e in zip(rows, exact)]))


def ndcg10(data, corpus: Path, queries: Path, rows: np.ndarray) -> float:
    from evaluation.metrics import evaluate
    from evaluation.search import ranking_from_hits

    ids = json.loads((corpus / "ids.json").read_text())
    query_ids = json.loads((queries / "ids.json").read_text())
    scores = -np.arange(rows.shape[1], dtype=np.float32)[None, :].repeat(len(rows), 0)  # rank order is what counts
    return evaluate(data.qrels, ranking_from_hits(query_ids, ids, scores, rows, DEPTH - 1))["nDCG@10"]


def measure(name: str, corpus: Path, queries: Path, out: Path, weight: float, smoke_run: bool, data=None,
            curve: bool = True, dense_kinds: tuple[str, ...] = ("hnsw",)) -> None:
    """Both methods on one corpus (the indexed one with each dense index kind; the first gives the default
    lines, the others curve_ lines); prints its lines."""
    out.mkdir(parents=True, exist_ok=True)
    exact = run_worker("exact", corpus, queries, out / f"{name}.exact.npy", weight, curve)
    # the builds in processes of their own, so the search's peak RSS is the search's (--smoke: built by the search)
    build = run_worker("build", corpus, queries, out / f"{name}.build", weight, curve) if curve else None
    share = sparse_share(corpus, queries, np.load(out / f"{name}.exact.npy"), weight)
    for kind in dense_kinds:
        faiss_file = out / f"{corpus.name}.{kind}.faiss"  # one build per corpus and kind (synthetic-sparse reuses it)
        if kind != "scan":  # the scan reads the RowStore: no index to build
            if (str(faiss_file), kind) not in DENSE_BUILT:
                DENSE_BUILT[str(faiss_file), kind] = run_worker("dense_build", corpus, queries, faiss_file, weight,
                                                               curve, kind)
            (out / f"{name}.{kind}.faiss").unlink(missing_ok=True)
            (out / f"{name}.{kind}.faiss").symlink_to(faiss_file.name)
        indexed = run_worker("indexed", corpus, queries, out / f"{name}.{kind}", weight, curve, kind)
        measure_indexed(name, corpus, queries, out, data, smoke_run, exact, build,
                        DENSE_BUILT.get((str(faiss_file), kind)), indexed, kind, primary=kind == dense_kinds[0],
                        sparse_weight=weight, sparse_share=share)


DENSE_BUILT: dict[tuple[str, str], dict] = {}  # (faiss file, kind) -> its build worker's result


def sparse_share(corpus: Path, queries: Path, exact_rows: np.ndarray, weight: float) -> float:
    """The share of the score the sparse half carries in the exact top-10: sum of w·sparse over sum of the
    scores (how far the ranking is the sparse half's)."""
    docs, q = cache.load(corpus.parent, corpus.name), cache.load(queries.parent, queries.name)
    rows = exact_rows[:, :10]
    dense = np.einsum("qcd,qd->qc", np.asarray(docs.dense)[rows], np.asarray(q.dense))
    vocab = np.asarray(q.vocab)
    at = vocab[np.arange(len(rows))[:, None, None], np.asarray(docs.sparse_indices)[rows]]  # [Q, 10, k]
    sparse = np.einsum("qck,qck->qc", at, np.asarray(docs.sparse_values)[rows])
    return float((weight * sparse).sum() / (dense + weight * sparse).sum())


def measure_indexed(name: str, corpus: Path, queries: Path, out: Path, data, smoke_run: bool, exact: dict,
                    build: dict | None, dense_build: dict | None, indexed: dict, kind: str, primary: bool,
                    **corpus_fields) -> None:
    """The lines of one indexed worker against the exact one (corpus_fields: added to each line; dense_build: the
    faiss build's worker, None for the scan)."""
    exact_rows = np.load(out / f"{name}.exact.npy")
    n, q = exact["docs"], exact["queries"]
    default = ",".join(map(str, DEFAULT[kind])) if primary else None
    for setting, timing in indexed["settings"].items():
        rows = np.load(out / f"{name}.{kind}.{setting.replace(',', '-')}.npy")
        figs = {"sec_per_query": (timing["seconds"] / q, exact["seconds"] / q, "lower", "s"),
                "recall@10_of_exact": (recall_of_exact(rows, exact_rows, 10), 1.0, "higher", "fraction"),
                "recall@100_of_exact": (recall_of_exact(rows, exact_rows, 100), 1.0, "higher", "fraction")}
        if data is not None:
            figs["ndcg@10"] = (ndcg10(data, corpus, queries, rows), ndcg10(data, corpus, queries, exact_rows),
                               "higher", "nDCG@10")
        m, cut, _ = map(int, setting.split(","))
        parts = {f"{part}_sec_per_query": round(timing[part] / q, 6) for part in ("dense", "sparse", "rescore")}
        for metric, (ours, baseline, better, unit) in figs.items():
            line(name, n, metric if setting == default else f"curve_{metric}", ours, baseline, better, unit,
                 smoke_run, candidates=m, query_cut=cut, **{DENSE_PARAM[kind].lower(): timing["used"]},
                 dense_index=dense_factory(n, kind), **(parts if metric == "sec_per_query" else {}), **corpus_fields)
    line(name, n, "peak_rss_mb" if primary else "curve_peak_rss_mb", indexed["peak_rss_mb"], exact["peak_rss_mb"],
         "lower", "MB", smoke_run, dense_index=dense_factory(n, kind),
         **({"index_build_seconds": round(build["seconds"], 2),
             "index_build_peak_rss_mb": round(build["peak_rss_mb"], 1)} if build else {}),
         **({"dense_index_seconds": round(dense_build["seconds"], 2),
             "dense_index_build_peak_rss_mb": round(dense_build["peak_rss_mb"], 1)} if dense_build else {}),
         store_seconds=round(indexed["store_seconds"], 2), **corpus_fields)


def extrapolate(printed: list[dict], out: Path, smoke_run: bool) -> None:
    """Extrapolate the synthetic corpora's default lines to the large corpora, part by part, by how each part grows:
    exact search scores every document (N·k per query): a·N through the origin; IVF dense candidates scan
    nprobe/nlist of the corpus, so holding the largest run's fraction (and so its recall) costs time linear in N;
    HNSW's walk grows about as log N at a fixed efSearch (held at the largest run's time x log N / log N_run);
    Seismic keeps at most n_postings x 1.5 postings per vocabulary id whatever N, so its search is held at the
    largest run's time (its fitted growth, clamped to [0, 1], where that is above 0); the rescoring reads 2M
    candidates: constant. Peak RSS: a straight line through the measured sizes."""
    syn = [p for p in printed if p["corpus"] == "synthetic" and not p.get("extrapolated")]
    speed = sorted((p for p in syn if p["metric"] == "sec_per_query"), key=lambda p: p["docs"])
    rss = sorted((p for p in syn if p["metric"] == "peak_rss_mb"), key=lambda p: p["docs"])
    if len(speed) < 2 or len(rss) != len(speed):
        return
    n = np.array([p["docs"] for p in speed], dtype=float)
    exact_rate = float(np.dot(n, [p["baseline"] for p in speed]) / np.dot(n, n))
    top = speed[-1]
    if top["dense_index"].startswith("scan"):
        dense_time, dense_growth = (lambda size: top["dense_sec_per_query"] * size / top["docs"]), (
            f"the dense scan linear in N at {top['dense_candidates']} dense candidates")
    elif top["dense_index"].startswith("IVF"):
        fraction = top["nprobe"] / int(top["dense_index"][3:].split(",")[0])  # scanned share of the largest run
        scanned = n * np.array([p["nprobe"] / int(p["dense_index"][3:].split(",")[0]) for p in speed])
        dense_rate = float(np.dot(scanned, [p["dense_sec_per_query"] for p in speed]) / np.dot(scanned, scanned))
        dense_time, dense_growth = (lambda size: dense_rate * size * fraction), (
            f"IVF candidates linear at {fraction:.1%} of the corpus scanned")
    else:
        dense_time = lambda size: top["dense_sec_per_query"] * np.log(size) / np.log(top["docs"])  # noqa: E731
        dense_growth = f"HNSW candidates log N at efSearch {top['efsearch']}"
    growth = float(np.clip(np.polyfit(np.log(n), np.log([p["sparse_sec_per_query"] for p in speed]), 1)[0], 0, 1))
    rss_fit = {k: np.polyfit(n, [p[k] for p in rss], 1) for k in ("baseline", "ours")}
    rows = ["| corpus | documents | exact s/query | indexed s/query (dense + sparse + rescore) | ratio | exact peak RSS "
            "GB | indexed peak RSS GB |", "|---|---|---|---|---|---|---|"]
    for name, size in LARGE.items():
        parts = [dense_time(size), top["sparse_sec_per_query"] * (size / top["docs"]) ** growth,
                 top["rescore_sec_per_query"]]
        ours, exact = sum(parts), exact_rate * size
        rss_e, rss_i = (float(np.polyval(rss_fit[k], size)) for k in ("baseline", "ours"))
        line(f"{name} (extrapolated)", size, "sec_per_query", ours, exact, "lower", "s", smoke_run, extrapolated=True,
             **{f"{p}_sec_per_query": round(v, 6) for p, v in zip(("dense", "sparse", "rescore"), parts)})
        line(f"{name} (extrapolated)", size, "peak_rss_mb", rss_i, rss_e, "lower", "MB", smoke_run, extrapolated=True)
        split = " + ".join(f"{v:.4f}" for v in parts)
        rows.append(f"| {name} | {size:,} | {exact:.3f} | {ours:.4f} ({split}) | {ours / exact:.3f} | "
                    f"{rss_e / 1024:.1f} | {rss_i / 1024:.1f} |")
    rows.append(f"\nFrom {', '.join(f'{int(x):,}' for x in n)} documents at candidates {top['candidates']}, query cut "
                f"{top['query_cut']}: exact {exact_rate * 1e6:.3f} s per query per million documents (linear); "
                f"{dense_growth}; Seismic N^{growth:.2f}; rescoring "
                "constant; peak RSS linear.")
    (out / "extrapolation.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows), file=sys.stderr)


def relabel(path: Path, smoke_run: bool) -> list[dict]:
    """Print a previous run's lines again with DEFAULT's lines as the figures and the others as curve_ lines (the
    measurements unchanged); extrapolated lines are dropped, to be computed again."""
    printed, labeled = [], set()
    for old in map(json.loads, Path(path).read_text().splitlines()):
        if old.get("extrapolated") or "candidates" not in old:
            if not old.get("extrapolated"):
                printed.append(old)
                print(json.dumps(old))
            continue
        kind = next((k for k in ("scan", "ivf") if old["dense_index"].lower().startswith(k)), "hnsw")
        value = DEFAULT[kind][2]
        if kind == "ivf":  # nprobe is capped at the number of lists
            value = min(value, int(old["dense_index"][3:].split(",")[0]))
        metric = old["metric"].removeprefix("curve_")
        default = (old["candidates"], old["query_cut"], old[DENSE_PARAM[kind].lower()]) == (*DEFAULT[kind][:2], value)
        # the first kind's line is the figure (a file holds the primary kind first); capped, 64 may equal 256
        default = default and (old["corpus"], old["docs"], metric) not in labeled
        labeled |= {(old["corpus"], old["docs"], metric)} if default else set()
        printed.append({**old, "metric": metric if default else f"curve_{metric}"})
        print(json.dumps(printed[-1]))
    return printed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/search_scale")
    parser.add_argument("--cache_dir", default=None, help="embedding cache of the real sets (default OUTPUT_DIR/cache)")
    parser.add_argument("--model", default=None, help="encoder (default: the packaged MiniLM)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--from_jsonl", type=Path, default=None,
                        help="print a previous run's lines again under this DEFAULT and extrapolate them (no search)")
    parser.add_argument("--dense_index", nargs="+", choices=list(DENSE_PARAM), default=["scan", "hnsw"],
                        help="the dense candidates' sources (the RowStore's scan, faiss indexes); the first gives the "
                             "default lines")
    parser.add_argument("--worker", choices=["exact", "build", "dense_build", "indexed"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sparse_weight", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--curve", action="store_true", help=argparse.SUPPRESS)
    args = smoke.parse_args(parser, argv, sizes=[1000], dense_index=["scan", "hnsw"])
    if args.worker:
        args.dense_index = args.dense_index[0]
        return worker(args)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.output_dir)
    if args.from_jsonl:
        out.mkdir(parents=True, exist_ok=True)
        return extrapolate(relabel(args.from_jsonl, args.smoke), out, args.smoke)
    sets, weight = real_sets(args)
    for name, corpus, queries, data in sets:
        measure(name, corpus, queries, out / "rows", weight, args.smoke, data, curve=not args.smoke,
                dense_kinds=tuple(args.dense_index))
    scifact_queries = sets[0][2]
    for size in args.sizes:
        corpus = synthesize([c for _, c, _, _ in sets], size, out / "synthetic" / f"n{size}")
        for name, corpus_weight in (("synthetic", weight), ("synthetic-sparse", SPARSE_HEAVY_WEIGHT)):
            measure(name, corpus, scifact_queries, out / "rows" / f"n{size}", corpus_weight, args.smoke,
                    curve=not args.smoke, dense_kinds=tuple(args.dense_index))
    extrapolate(PRINTED, out, args.smoke)


if __name__ == "__main__":
    main()
