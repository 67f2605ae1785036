"""Training groups (query, positives, ranked hard negatives) from a BEIR folder or `preprocessing.finetune_data`'s
Arrow files, the batches each rank draws from them per epoch, and the collator that pads them.

Malformed input records never stop a run and are never silently dropped: each is logged with file, line and
field, counted, and appended to a dead-letter JSONL file.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import torch
from torch import Tensor

from common.shard_format import (FINETUNE_CORPUS_FILE, FINETUNE_GROUPS_FILE, FINETUNE_QUERIES_FILE, MANIFEST_NAME,
                                 Manifest)
from common.tokenizer import TokenizerError, vocab_hash
from finetune.teacher import teacher_paths

logger = logging.getLogger(__name__)

Text = str | list[int]  # raw text (BEIR folders) or token ids without special tokens (Arrow files)


@dataclass
class TrainGroup:
    query_id: str
    positives: list[str]  # qrels score > 0
    negatives: list[str]  # ranked hard negatives; positives and unknown ids removed


@dataclass
class FinetuneData:
    queries: dict[str, Text]
    corpus: dict[str, Text]
    groups: list[TrainGroup]


class DeadLetter:
    """Counts malformed records, logs each as `file:line: reason`, and appends them to a JSONL file."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.count = 0

    def add(self, source: str | Path, line: int, reason: str, record: str) -> None:
        self.count += 1
        logger.warning("%s:%d: %s (written to %s)", source, line, reason, self.path or "no dead-letter file")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"source": str(source), "line": line, "reason": reason, "record": record}) + "\n")


def read_jsonl(path: Path, fields: dict[str, type], dead_letter: DeadLetter) -> Iterator[dict]:
    """The records of a JSONL file that have every field of `fields` with its type; the rest go to dead_letter."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                dead_letter.add(path, number, f"invalid JSON ({exc.msg})", line.rstrip("\n"))
                continue
            problem = _field_problem(record, fields)
            if problem:
                dead_letter.add(path, number, problem, line.rstrip("\n"))
                continue
            yield record


def _field_problem(record, fields: dict[str, type]) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name, kind in fields.items():
        if name not in record:
            return f"field '{name}' is missing"
        value = record[name]
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            return f"field '{name}' must be {'a list of strings' if kind is list else kind.__name__}"
    return None


def read_qrels(path: Path, dead_letter: DeadLetter, queries: dict, corpus: dict) -> dict[str, list[str]]:
    """query id -> doc ids with score > 0, in file order; rows naming an unknown query or document are dead letters."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (qrels/<split>.tsv of a BEIR folder)")
    positives: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            cols = line.rstrip("\n").split("\t")
            if number == 1 and cols[0] == "query-id" or not line.strip():
                continue
            if len(cols) != 3 or not cols[2].lstrip("-").isdigit():
                dead_letter.add(path, number, "expected 'query-id<TAB>corpus-id<TAB>integer score'", line.rstrip("\n"))
                continue
            if cols[0] not in queries or cols[1] not in corpus:
                what = f"query id {cols[0]!r}" if cols[0] not in queries else f"corpus id {cols[1]!r}"
                dead_letter.add(path, number, f"{what} is not in {path.parent.parent}", line.rstrip("\n"))
                continue
            if int(cols[2]) > 0 and cols[1] not in positives.setdefault(cols[0], []):
                positives[cols[0]].append(cols[1])
    return {qid: docs for qid, docs in positives.items() if docs}


def read_negatives(path: str | Path, dead_letter: DeadLetter) -> dict[str, list[str]]:
    """The mining output: query id -> ranked doc ids (one JSONL line {"query_id", "negatives"} per query)."""
    fields = {"query_id": str, "negatives": list}
    return {r["query_id"]: r["negatives"] for r in read_jsonl(Path(path), fields, dead_letter)}


def load_beir(data_dir: str | Path, split: str, negatives: str | None, dead_letter: DeadLetter) -> FinetuneData:
    """Passages are title + " " + text; only queries with a positive in the qrels split are kept."""
    folder = Path(data_dir)
    corpus = {r["_id"]: f"{r.get('title') or ''} {r['text']}".strip()
              for r in read_jsonl(folder / "corpus.jsonl", {"_id": str, "text": str}, dead_letter)}
    queries = {r["_id"]: r["text"] for r in read_jsonl(folder / "queries.jsonl", {"_id": str, "text": str}, dead_letter)}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    ranked = read_negatives(negatives, dead_letter) if negatives else {}
    groups = [TrainGroup(qid, positives, clean_negatives(ranked.get(qid, []), positives, corpus))
              for qid, positives in read_qrels(qrels_path, dead_letter, queries, corpus).items()]
    queries = {g.query_id: queries[g.query_id] for g in groups}
    return FinetuneData(queries, corpus, groups)


def clean_negatives(ranked: list[str], positives: list[str], corpus: dict) -> list[str]:
    """Ranked ids minus positives, unknown ids and repeats: a negative is never a positive."""
    banned, kept = set(positives), []
    for doc_id in ranked:
        if doc_id not in banned and doc_id in corpus:
            banned.add(doc_id)
            kept.append(doc_id)
    return kept


def _read_arrow(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (listed by {MANIFEST_NAME})")
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def load_arrow(data_dir: str | Path, tokenizer) -> FinetuneData:
    """preprocessing.finetune_data output: token ids (no special tokens) and groups with their own negatives."""
    folder = Path(data_dir)
    manifest = Manifest.read(folder)
    if manifest.kind != "finetune":
        raise ValueError(f"{folder / MANIFEST_NAME}: kind is {manifest.kind!r}, expected 'finetune'")
    if manifest.vocab_hash != vocab_hash(tokenizer):
        raise TokenizerError(f"{folder} was tokenized with {manifest.tokenizer!r}, whose vocabulary differs from "
                             "the model's tokenizer")
    corpus_table = _read_arrow(folder / FINETUNE_CORPUS_FILE)
    query_table = _read_arrow(folder / FINETUNE_QUERIES_FILE)
    corpus = dict(zip(corpus_table.column("doc_id").to_pylist(), corpus_table.column("input_ids").to_pylist()))
    queries = dict(zip(query_table.column("query_id").to_pylist(), query_table.column("input_ids").to_pylist()))
    groups = [TrainGroup(row["query_id"], row["positive_ids"],
                         clean_negatives(row["negative_ids"], row["positive_ids"], corpus))
              for row in _read_arrow(folder / FINETUNE_GROUPS_FILE).to_pylist()]
    return FinetuneData(queries, corpus, groups)


def input_files(data_dir: str, split: str, negatives: str | None, teacher_scores: str | None) -> dict[str, Path]:
    """The files a run reads, by name, for its provenance's hashes: the manifest of preprocessing output, or a BEIR
    folder's corpus, queries and qrels split; then the negatives and teacher score files."""
    folder = Path(data_dir)
    if (folder / MANIFEST_NAME).is_file():
        files = {MANIFEST_NAME: folder / MANIFEST_NAME}
    else:
        files = {name: folder / name for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv")}
    extra = [negatives] if negatives else []
    extra += teacher_paths(teacher_scores) if teacher_scores else []
    return {**files, **{path: Path(path) for path in extra}}


def load_finetune_data(data_dir: str, split: str, negatives: str | None, tokenizer,
                       dead_letter: DeadLetter) -> FinetuneData:
    """A folder with manifest.json is preprocessing output (Arrow); anything else is read as a BEIR folder."""
    if (Path(data_dir) / MANIFEST_NAME).is_file():
        if negatives:
            raise ValueError(f"--negatives applies to BEIR folders; {data_dir} is preprocessing output whose groups "
                             "carry their negatives (give the negatives file to preprocessing.finetune_data)")
        data = load_arrow(data_dir, tokenizer)
    else:
        data = load_beir(data_dir, split, negatives, dead_letter)
    if not data.groups:
        raise ValueError(f"{data_dir}: no training query with a positive document")
    without = sum(not g.negatives for g in data.groups)
    logger.info("%d training queries, %d passages; %d queries without hard negatives (random ones are drawn)",
                len(data.groups), len(data.corpus), without)
    return data


class GroupSampler:
    """What rank r trains on at (epoch, step), as a pure function of the seed, so resuming is exact.

    Each epoch shuffles the groups; global batch s is the slice [s*B*W, (s+1)*B*W) of that order and rank r takes
    its r-th block of B, so the ranks' batches concatenated in rank order equal one process's batch of B*W.
    """

    def __init__(self, groups: list[TrainGroup], corpus_ids: list[str], group_size: int, batch_size: int,
                 rank: int, world_size: int, seed: int):
        self.groups, self.corpus_ids, self.group_size = groups, corpus_ids, group_size
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.steps_per_epoch = len(groups) // (batch_size * world_size)  # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(groups)} training queries are fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks)")
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.groups), generator=generator).tolist())
        return self._order[1]

    def batch(self, epoch: int, step: int) -> list[tuple[str, list[str]]]:
        """(query id, [positive, negative, ...]) for this rank's B queries."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return [self.sample_group(epoch, i) for i in self.order(epoch)[start:start + self.batch_size]]

    def sample_group(self, epoch: int, index: int) -> tuple[str, list[str]]:
        """One positive and group_size - 1 negatives, drawn from the ranked list (random documents if it is empty)."""
        group = self.groups[index]
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        passages = [rng.choice(group.positives)]
        wanted = self.group_size - 1
        if wanted and group.negatives:
            pool = group.negatives
            passages += rng.sample(pool, wanted) if len(pool) >= wanted else rng.choices(pool, k=wanted)
        elif wanted:
            banned = set(group.positives)
            if len(self.corpus_ids) <= len(banned):
                raise ValueError(f"query {group.query_id!r}: the corpus has no document that is not a positive")
            while len(passages) <= wanted:
                doc_id = rng.choice(self.corpus_ids)
                if doc_id not in banned:
                    passages.append(doc_id)
        return group.query_id, passages


class Collator:
    """Texts or token ids -> padded [CLS] x [SEP] batches cut at the given lengths."""

    def __init__(self, tokenizer, query_max_length: int, passage_max_length: int):
        self.tokenizer = tokenizer
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length

    def __call__(self, queries: list[Text], passages: list[Text]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return self.encode(queries, self.query_max_length), self.encode(passages, self.passage_max_length)

    def encode(self, texts: list[Text], max_length: int) -> dict[str, Tensor]:
        body = max_length - 2
        strings = [i for i, t in enumerate(texts) if isinstance(t, str)]
        ids = list(texts)
        if strings:
            tokenized = self.tokenizer([texts[i] for i in strings], add_special_tokens=False, truncation=True,
                                       max_length=body)["input_ids"]
            for i, tokens in zip(strings, tokenized):
                ids[i] = tokens
        rows = [[self.tokenizer.cls_token_id, *tokens[:body], self.tokenizer.sep_token_id] for tokens in ids]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            attention_mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
