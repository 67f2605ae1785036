"""An index for the dupmae sparse half: Seismic (Bruch, Nardini, Rulli & Venturini, SIGIR 2024; PyPI pyseismic-lsr)
over the documents' kept vocabulary entries, cached next to the corpus shard it indexes.

Seismic keeps, for each vocabulary id, the postings with the largest values, groups each list into blocks with a
summary vector, and at query time scans only the blocks whose summary can beat the current top-M (query_cut: the
query's largest entries it reads; heap_factor: how eagerly it skips). It returns candidates: `evaluation.search`
rescores their union with faiss's dense candidates by the dupmae formula (float16 rows, `RowStore`). The index
holds each document's `doc_top` largest entries with a positive value (Seismic's pruning and summaries rank by
value; for `sparse_values` = probs all are positive); the rescoring reads every kept entry.

Cache safety: an index folder is written under a temporary name and renamed when whole; its `index.json` records
what it was built from (the corpus shard's content digest, model, k, rows, options, library version), and a folder whose
record differs from what is asked for is refused and rebuilt. Temporary folders are named and swept as the
embedding cache's are (`evaluation.cache.temporary`, `sweep_stale`: by host, PID and a random suffix; by age).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from evaluation.cache import drop_pages, publish, sweep_stale, temporary

logger = logging.getLogger(__name__)

INDEX_FILE = "seismic"  # Seismic appends .index.seismic
RECORD = "index.json"


@dataclass(frozen=True)
class SeismicConfig:
    """Seismic's build options: its defaults (tuned by its authors on MS MARCO with SPLADE), but for doc_top and
    n_postings. Summaries cost more than linearly in a document's entries: on 20k synthetic documents (2 busy
    cores) the build took 400 s with all 384 entries and n_postings 1000, 20 s with the top 64."""

    n_postings: int = 1000  # average postings kept per vocabulary id (largest values first)
    centroid_fraction: float = 0.1  # blocks per posting list, as a fraction of its length
    summary_energy: float = 0.4  # share of a block's L1 mass its summary keeps
    doc_cut: int = 15  # a document's largest entries used to cluster postings into blocks
    doc_top: int = 64  # a document's largest entries the index holds (the exact rescoring reads all k)

    def __post_init__(self) -> None:
        if self.n_postings <= 0 or self.doc_cut <= 0 or self.doc_top <= 0:
            raise ValueError(f"SeismicConfig: n_postings and doc_cut must be positive, got {self}")
        if not (0 < self.centroid_fraction <= 1 and 0 < self.summary_energy <= 1):
            raise ValueError(f"SeismicConfig: centroid_fraction and summary_energy must be in (0, 1], got {self}")


def sorted_csr(indices: np.ndarray, values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, k] kept entries -> CSR (components int64, values float32, offsets int64 [N + 1]) of each row's `top`
    largest positive values (what Seismic indexes), ids increasing within a row."""
    values = np.asarray(values, dtype=np.float32)
    if top < values.shape[1]:
        largest = np.argpartition(-values, top - 1, axis=1)[:, :top]  # [N, top]
        values, indices = np.take_along_axis(values, largest, 1), np.take_along_axis(np.asarray(indices), largest, 1)
    order = np.argsort(indices, axis=1)
    idx = np.take_along_axis(np.asarray(indices), order, 1).astype(np.int64)
    val = np.take_along_axis(values, order, 1)
    keep = val > 0
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=offsets[1:])
    return idx[keep], val[keep], offsets


class SeismicIndex:
    """A Seismic index over the rows of one corpus shard; `search` returns row numbers."""

    BUILD_ROWS = 1 << 16  # rows converted and added to Seismic's dataset at once

    def __init__(self, index, rows: int):
        self.index, self.rows = index, rows

    @classmethod
    def build(cls, indices: np.ndarray, values: np.ndarray, config: SeismicConfig = SeismicConfig()) -> "SeismicIndex":
        import seismic

        n = len(indices)
        dataset = seismic.SeismicDataset()
        for start in range(0, n, cls.BUILD_ROWS):
            stop = min(start + cls.BUILD_ROWS, n)
            comps, vals, offsets = sorted_csr(indices[start:stop], values[start:stop], config.doc_top)
            drop_pages(indices, values)
            dataset.add_documents_by_id([str(r) for r in range(start, stop)], comps, vals, offsets)
        index = seismic.SeismicIndex.build_from_dataset(
            dataset, n_postings=config.n_postings, centroid_fraction=config.centroid_fraction,
            summary_energy=config.summary_energy, doc_cut=config.doc_cut)
        return cls(index, n)

    def search(self, query_vocab: np.ndarray, candidates: int, query_cut: int, heap_factor: float) -> np.ndarray:
        """Rows [Q, candidates] of the best documents by the sparse dot product with each query's query_cut
        largest entries (-1 where fewer are found)."""
        top = np.argpartition(-query_vocab, min(query_cut, query_vocab.shape[1] - 1), axis=1)[:, :query_cut]
        import seismic

        text = seismic.get_seismic_string()  # the string dtype Seismic's ids and components come in
        top_values = np.take_along_axis(query_vocab, top, 1).astype(np.float32)
        comps, vals = [], []
        for ids, v in zip(top, top_values):
            keep = v > 0
            comps.append(ids[keep].astype(str).astype(text))
            vals.append(np.ascontiguousarray(v[keep]))
        query_ids = np.arange(len(top)).astype(str).astype(text)
        results = self.index.batch_search(query_ids, comps, vals, k=candidates, query_cut=query_cut,
                                          heap_factor=heap_factor)
        rows = np.full((len(top), candidates), -1, dtype=np.int64)
        for hits in results:  # not in the queries' order: each hit names its query (a query with none stays -1)
            if hits:
                rows[int(hits[0][0]), :len(hits)] = [int(doc) for _, _, doc in hits]
        return rows

    def save(self, folder: Path) -> None:
        self.index.save(str(folder / INDEX_FILE))

    @classmethod
    def load(cls, folder: Path, rows: int) -> "SeismicIndex":
        import seismic

        return cls(seismic.SeismicIndex.load(str(folder / f"{INDEX_FILE}.index.seismic")), rows)


def index_record(corpus_key: str, model: dict, top_k: int, rows: int, config: SeismicConfig) -> dict:
    """What an index is built from; a cached index is used only when its record equals the one asked for."""
    return {"library": f"pyseismic-lsr {version('pyseismic-lsr')}", "corpus": corpus_key, "model": model,
            "top_k": top_k, "rows": rows, "config": asdict(config)}


def load_or_build(folder: Path, record: dict, indices: np.ndarray, values: np.ndarray,
                  config: SeismicConfig = SeismicConfig()) -> SeismicIndex:
    """The index in `folder` when its record equals `record`; otherwise build it, write it atomically, return it."""
    folder = Path(folder)
    sweep_stale(folder.parent)
    if (folder / RECORD).is_file():
        found = json.loads((folder / RECORD).read_text())
        if found == json.loads(json.dumps(record, default=str)):
            logger.info("sparse index cache hit: %s", folder)
            return SeismicIndex.load(folder, record["rows"])
        differs = sorted(k for k in set(found) | set(record) if found.get(k) != record.get(k))
        logger.warning("%s: refused, built for another %s; rebuilding", folder / RECORD, "/".join(differs))
    logger.info("building the Seismic index of %d documents into %s", len(indices), folder)
    index = SeismicIndex.build(indices, values, config)
    tmp = temporary(folder)
    tmp.mkdir(parents=True)
    index.save(tmp)
    (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")  # written last: marks it whole
    publish(tmp, folder, replace=True)  # a folder there was refused above (another record)
    return index
