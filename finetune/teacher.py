"""Distillation from a teacher's scores: the score files, the lookup of a batch's teacher scores, and the KL term.

Score file (the official RetroMAE bi-encoder's `--teacher_score_files` format): one `qid did score` line per
(query, document) pair, whitespace-separated; blank lines are skipped; a score may be written `[1.5]` (the official
reader strips the brackets). `finetune.teacher_scores` writes them. Several files (`a.txt,b.txt`) are read in order,
a later pair overriding an earlier one.

The loss, for query i with its group g_i of G passages (positive first, then its hard negatives), student scores
s_ij and teacher scores t_ij (j in g_i):
    KL_i = Σ_j p_ij (log p_ij − log q_ij),   p_i = softmax(t_i / τ_t),   q_i = softmax(s_i / τ)
    L = mean_i KL_i + contrastive_loss_weight · InfoNCE
τ is the student's InfoNCE temperature, τ_t `--teacher_temperature`. Only the query's own group carries teacher
scores, so the KL runs over it, as in the official code; in-batch and cross-device passages enter InfoNCE only.
The official code takes `nn.KLDivLoss(reduction="mean")` (the sum divided by Bq · G) with τ_t = 1; this is the
per-query KL (`batchmean`), which is G times that: the KL's own scale (`--kl_reduction mean` gives the official
one). Runs in fp32 under bf16 too.
References: RetroMAE `src/bi_encoder/modeling.py` (`kl_loss`, `contrastive_loss_weight`), Hinton et al. 2015.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from finetune.loss import at_least_fp32

TeacherScores = dict[str, dict[str, float]]  # query id -> {doc id: teacher score}


class TeacherScoreError(ValueError):
    """A malformed score file line (names file:line), or a training pair without a teacher score (names both ids)."""


def teacher_paths(spec: str) -> list[str]:
    """The files of --teacher_scores: one path or a comma-separated list (empty entries dropped)."""
    return [path for path in spec.split(",") if path]


def read_teacher_scores(files: str | Path | list[str | Path]) -> TeacherScores:
    """{query id: {doc id: score}} from one path, a comma-separated list, or a list of paths."""
    paths = teacher_paths(str(files)) if isinstance(files, (str, Path)) else list(files)
    scores: TeacherScores = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such teacher score file")
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                cols = line.split()
                if not cols:
                    continue
                if len(cols) != 3:
                    raise TeacherScoreError(f"{path}:{number}: expected 'qid did score', got {line.rstrip()!r}")
                try:
                    value = float(cols[2].strip("[]"))
                except ValueError:
                    raise TeacherScoreError(f"{path}:{number}: score {cols[2]!r} is not a number") from None
                if value != value or value in (float("inf"), float("-inf")):
                    raise TeacherScoreError(f"{path}:{number}: score {cols[2]!r} is not finite")
                scores.setdefault(cols[0], {})[cols[1]] = value
    return scores


def write_teacher_scores(path: str | Path, scores: TeacherScores) -> None:
    """The official format, atomically (a temporary file renamed), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # this writer's own: two shards may merge at once
    try:
        with open(tmp, "x", encoding="utf-8") as out:
            for qid, row in scores.items():
                for did, value in row.items():
                    if len(qid.split()) != 1 or len(did.split()) != 1:
                        raise ValueError(f"{path}: ids with whitespace cannot be written as 'qid did score': "
                                         f"{qid!r}, {did!r}")
                    out.write(f"{qid} {did} {value:.9g}\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def group_scores(table: TeacherScores, batch: list[tuple[str, list[str]]]) -> Tensor:
    """[Bq, G] fp32 teacher scores of each (query id, [positive, negatives...]) group; a pair the table lacks is an
    error naming it (never a silent zero)."""
    rows = []
    for qid, doc_ids in batch:
        row = table.get(qid, {})
        missing = [d for d in doc_ids if d not in row]
        if missing:
            raise TeacherScoreError(f"no teacher score for query {qid!r} and document {missing[0]!r}"
                                    f"{f' (and {len(missing) - 1} more of its group)' if len(missing) > 1 else ''}; "
                                    "score every positive and mined negative (python -m finetune.teacher_scores)")
        rows.append([row[d] for d in doc_ids])
    return torch.tensor(rows, dtype=torch.float32)


def check_coverage(table: TeacherScores, groups, corpus_ids: Iterable[str]) -> None:
    """Fail before training when a document the sampler can draw for a query has no teacher score (the first one
    named): a group's positives and mined negatives, and for a query without mined negatives, whose group
    `GroupSampler` fills with random corpus documents, every corpus document (else the run would stop at the first
    batch holding one, possibly hours in). `corpus_ids` is iterated once per query without mined negatives (a
    dict's keys: not copied)."""
    for group in groups:
        group_scores(table, [(group.query_id, group.positives + group.negatives)])
    for group in groups:
        if group.negatives:
            continue
        row = table.get(group.query_id, {})
        missing = next((d for d in corpus_ids if d not in row), None)
        if missing is not None:
            raise TeacherScoreError(f"query {group.query_id!r} has no mined negatives, so its group is drawn from the "
                                    f"whole corpus, and document {missing!r} has no teacher score: mine negatives "
                                    "for every training query (python -m finetune.mine_negatives) and score them, "
                                    "or score every document for it")


def own_group(scores: Tensor, labels: Tensor, group_size: int) -> Tensor:
    """[Bq, Bp] scores -> [Bq, G]: each query's scores against its own group (labels: its positive's column)."""
    columns = labels[:, None] + torch.arange(group_size, device=scores.device)  # [Bq, G]
    return scores.gather(1, columns)


def distill_kl(student: Tensor, teacher: Tensor, temperature: float | Tensor, teacher_temperature: float,
               reduction: str = "batchmean") -> Tensor:
    """Mean over queries of KL(softmax(teacher / τ_t) || softmax(student / τ)); student, teacher [Bq, G].
    reduction "mean" divides by Bq · G instead, as the official code does (--kl_reduction)."""
    log_q = F.log_softmax(at_least_fp32(student) / temperature, dim=-1)  # [Bq, G]
    log_p = F.log_softmax(at_least_fp32(teacher) / teacher_temperature, dim=-1)  # [Bq, G]
    return F.kl_div(log_q, log_p, log_target=True, reduction=reduction)
