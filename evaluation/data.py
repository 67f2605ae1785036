"""BEIR folders (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) read the way the `beir` package reads them.

Conventions kept so numbers compare with published ones: a document is (title + " " + text).strip() (text alone
without a title), the evaluated queries are exactly those with qrels in the split, qrels scores are integers.
A bad line is an error naming file and line: an evaluation on a silently shortened corpus would be wrong.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.cache import sweep_stale, temporary

logger = logging.getLogger(__name__)

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
DOWNLOAD_TIMEOUT_S = 30


class DatasetError(ValueError):
    """A dataset that is missing or malformed; the message names the file (and line)."""


@dataclass
class BeirData:
    name: str
    folder: Path
    doc_ids: list[str]  # corpus order of corpus.jsonl
    doc_texts: list[str]  # title + " " + text
    query_ids: list[str]  # the split's queries, in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}


def resolve_dataset(spec: str, data_dir: str | Path, allow_download: bool) -> Path:
    """A BEIR folder path as given, or a bare BEIR name under data_dir (downloaded when allowed and reachable)."""
    path = Path(spec)
    if (path / "corpus.jsonl").is_file():
        return path
    if os.sep in spec or "/" in spec or path.exists():
        raise DatasetError(f"{spec}: not a BEIR folder (no corpus.jsonl)")
    target = Path(data_dir) / spec
    if (target / "corpus.jsonl").is_file():
        return target
    url = BEIR_URL.format(name=spec)
    hint = f"download {url}, unzip it and put the folder at {target} (or pass the folder's path)"
    if not allow_download:
        raise DatasetError(f"dataset {spec!r} is not at {target} and downloads are off (offline): {hint}")
    if target.exists() and not (target / "corpus.jsonl").is_file():  # (a download appears whole: see _download)
        raise DatasetError(f"dataset {spec!r}: {target} exists without corpus.jsonl (a partial copy?): remove it "
                           f"or {hint}")
    try:
        _download(url, Path(data_dir), spec)
    except OSError as exc:  # URLError, timeouts, bad zip all derive from OSError or are wrapped below
        raise DatasetError(f"dataset {spec!r}: download of {url} failed ({exc}): {hint}") from None
    if not (target / "corpus.jsonl").is_file():
        raise DatasetError(f"dataset {spec!r}: {url} did not contain {spec}/corpus.jsonl: {hint}")
    return target


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an flock on `path` (made if missing), waiting for the task that holds it. A filesystem without flock
    across nodes (Lustre mounted without -o flock) holds nothing: _download stays correct, only not alone."""
    with open(path, "a") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another task's download (%s is locked)", path)
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: no lock to be had here
            logger.warning("%s: no lock (%s); downloading without one", path, exc)
        yield


def _download(url: str, data_dir: Path, name: str) -> None:
    """Fetch and unzip `name` into data_dir/name, as one task of many that may ask at once (evaluation shards on
    several nodes): one downloads under a lock while the others wait, and the folder appears whole, renamed
    from the cache's temporary folder of this task's own (evaluation.cache.temporary: host, pid, random suffix),
    so no task reads a half-extracted one; a killed task's folder is swept by a later one on its host."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / name
    with _exclusive(data_dir / f".{name}.download.lock"):
        if (target / "corpus.jsonl").is_file():  # another task downloaded it while this one waited
            return
        sweep_stale(data_dir)
        staging = temporary(target)
        archive, extracted = staging / f"{name}.zip", staging / "extracted"
        try:
            staging.mkdir()
            logger.info("downloading %s to %s", url, data_dir)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, archive.open("wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(extracted)
            except zipfile.BadZipFile as exc:
                raise OSError(f"bad zip archive: {exc}") from None
            if (extracted / name).is_dir():
                try:
                    os.rename(extracted / name, target)
                except OSError:
                    if not (target / "corpus.jsonl").is_file():  # not a task that got there first (no lock)
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _read_jsonl(path: Path, required: tuple[str, ...]):
    """(line number, record) for every line; a non-JSON line or a missing/non-string field is an error."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object")
            for key in required:
                if not isinstance(record.get(key), str):
                    raise DatasetError(f"{path}:{lineno}: field {key!r} is missing or not a string")
            yield lineno, record


def _read_texts(path: Path, with_title: bool) -> dict[str, str]:
    texts: dict[str, str] = {}
    for lineno, record in _read_jsonl(path, ("_id", "text")):
        if record["_id"] in texts:
            raise DatasetError(f"{path}:{lineno}: duplicate _id {record['_id']!r}")
        title = record.get("title")
        if with_title and title is not None and not isinstance(title, str):
            raise DatasetError(f"{path}:{lineno}: field 'title' is not a string")
        text = (title + " " + record["text"]) if with_title and title is not None else record["text"]
        texts[record["_id"]] = text.strip()
    return texts


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query-id <TAB> corpus-id <TAB> score, after one header line."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (is the split name right?)")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 or not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 3:
                raise DatasetError(f"{path}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
            try:
                relevance = int(fields[2])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: score {fields[2]!r} is not an integer") from None
            qrels.setdefault(fields[0], {})[fields[1]] = relevance
    return qrels


def load_beir(folder: str | Path, split: str) -> BeirData:
    folder = Path(folder)
    corpus = _read_texts(folder / "corpus.jsonl", with_title=True)
    if not corpus:
        raise DatasetError(f"{folder / 'corpus.jsonl'}: no documents")
    queries = _read_texts(folder / "queries.jsonl", with_title=False)
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise DatasetError(f"{folder / 'qrels' / f'{split}.tsv'}: {len(missing)} query ids not in queries.jsonl "
                           f"(first: {missing[0]!r})")
    query_ids = [qid for qid in queries if qid in qrels]
    logger.info("%s: %d documents, %d %s queries", folder.name, len(corpus), len(query_ids), split)
    return BeirData(folder.name, folder, list(corpus), list(corpus.values()), query_ids,
                    [queries[q] for q in query_ids], qrels)


def subsample(data: BeirData, max_queries: int, max_docs: int, seed: int = 0) -> BeirData:
    """A smaller copy for quick, repeatable measurements: a seeded sample of at most `max_queries` queries, every
    document judged for them, and seeded random other documents up to `max_docs` in all (0 = no limit).

    Scores on it are higher than on the whole corpus (fewer distractors) but compare between models."""
    rng = np.random.default_rng(seed)
    query_rows = np.arange(len(data.query_ids))
    if 0 < max_queries < len(query_rows):
        query_rows = np.sort(rng.choice(query_rows, max_queries, replace=False))
    query_ids = [data.query_ids[i] for i in query_rows]
    judged = {doc for qid in query_ids for doc in data.qrels[qid]}
    doc_rows = np.arange(len(data.doc_ids))
    if 0 < max_docs < len(doc_rows):
        is_judged = np.fromiter((d in judged for d in data.doc_ids), dtype=bool, count=len(data.doc_ids))
        others = doc_rows[~is_judged]
        extra = rng.choice(others, min(len(others), max(0, max_docs - int(is_judged.sum()))), replace=False)
        doc_rows = np.sort(np.concatenate([doc_rows[is_judged], extra]))
    return BeirData(data.name, data.folder, [data.doc_ids[i] for i in doc_rows], [data.doc_texts[i] for i in doc_rows],
                    query_ids, [data.query_texts[i] for i in query_rows], {q: data.qrels[q] for q in query_ids})
