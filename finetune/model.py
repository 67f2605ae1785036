"""The bi-encoder trained by fine-tuning: a query encoder and a passage encoder (one shared module by default)."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from common.representation import Encoder, Representation, resolve_config, score
from finetune.config import FinetuneConfig
from finetune.loss import (calibrated_temperature, default_temperature, gather_detached_but_own, gather_with_grad,
                           info_nce, learning_share, positive_labels)
from finetune.teacher import distill_kl, own_group

logger = logging.getLogger(__name__)


@dataclass
class BiEncoderOutput:
    loss: Tensor  # scalar: InfoNCE, or with teacher scores distill + contrastive_loss_weight x InfoNCE
    contrastive: Tensor  # scalar InfoNCE of this rank's queries (--official_cross_device: of every rank's)
    distill: Tensor  # scalar KL to the teacher over each query's group (finetune/teacher.py); 0 without a teacher
    accuracy: Tensor  # scalar: fraction of this rank's queries whose positive scores highest
    learning: Tensor  # scalar: fraction of this rank's queries that still get a gradient (see `learning_share`)
    scores: Tensor  # [Bq, Bp] (Bp counts every rank's passages with cross-device negatives)


class BiEncoder(nn.Module):
    """Scores queries against passages with `common.representation.score` and returns the InfoNCE loss, plus the KL
    to a teacher's scores when they are given (finetune/teacher.py)."""

    def __init__(self, query_encoder: Encoder, passage_encoder: Encoder | None, temperature: float | None,
                 group_size: int, cross_device_negatives: bool, teacher_temperature: float = 1.0,
                 contrastive_loss_weight: float = 1.0, kl_reduction: str = "batchmean",
                 official_cross_device: bool = False):
        super().__init__()
        self.teacher_temperature, self.contrastive_loss_weight = teacher_temperature, contrastive_loss_weight
        self.kl_reduction, self.official_cross_device = kl_reduction, official_cross_device
        self.query_encoder = query_encoder
        self.passage_encoder = passage_encoder  # None: tied, the query encoder encodes passages too
        self.temperature, self.group_size = temperature, group_size
        self.cross_device_negatives = cross_device_negatives
        if temperature is None:  # calibrated on the first batch; a buffer, so a checkpoint keeps it for the resume
            self.register_buffer("calibrated", torch.zeros(()))

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> "BiEncoder":
        rep = resolve_config(cfg.model_name_or_path, kind=cfg.representation, normalize=cfg.normalize,
                             dense_dim=cfg.dense_dim, top_k=cfg.top_k, sparse_weight=cfg.sparse_weight)
        temperature = cfg.temperature if cfg.temperature is not None else default_temperature(rep)
        logger.info("representation %s, temperature %s%s", rep,
                    "calibrated on the first batch" if temperature is None else temperature,
                    "" if cfg.temperature is not None else " (default for these scores)")
        query_encoder = Encoder.from_pretrained(cfg.model_name_or_path, rep)
        passage_encoder = copy.deepcopy(query_encoder) if cfg.untie_encoders else None
        return cls(query_encoder, passage_encoder, temperature, cfg.train_group_size, cfg.cross_device_negatives,
                   cfg.teacher_temperature, cfg.contrastive_loss_weight, cfg.kl_reduction, cfg.official_cross_device)

    def temperature_for(self, scores: Tensor) -> float | Tensor:
        """The fixed temperature, or the one calibrated on the first batch's scores [Bq, Bp] (kept from then on)."""
        if self.temperature is not None:
            return self.temperature
        if not self.calibrated.item():
            self.calibrated.copy_(calibrated_temperature(scores))
            logger.info("temperature calibrated on the first batch: %.4g (mean per-query spread of the scores)",
                        self.calibrated.item())
        return self.calibrated

    @property
    def passage_side(self) -> Encoder:
        return self.passage_encoder if self.passage_encoder is not None else self.query_encoder

    def forward(self, query: dict[str, Tensor], passage: dict[str, Tensor],
                teacher: Tensor | None = None) -> BiEncoderOutput:
        """teacher: [Bq, G] teacher scores of each query's group (positive first), or None (InfoNCE alone)."""
        q = self.query_encoder(**query)  # dense [Bq, D], vocab [Bq, V] | None
        p = self.passage_side(**passage)  # dense [Bq*G, D], vocab [Bq*G, V] | None
        offset, everyone = 0, None
        if self.cross_device_negatives and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * p.dense.shape[0]
            gather = gather_detached_but_own if self.official_cross_device else gather_with_grad
            p = Representation(gather(p.dense), None if p.vocab is None else gather(p.vocab))
            if self.official_cross_device:  # every rank's queries, only this rank's with gradient
                everyone = Representation(gather(q.dense), None if q.vocab is None else gather(q.vocab))
        rep = self.query_encoder.config
        top_k = rep.top_k if p.vocab is not None else None
        if everyone is None:
            scores = score(q, p, top_k, rep.sparse_weight)  # [Bq, Bp]
        else:
            all_scores = score(everyone, p, top_k, rep.sparse_weight)  # [W*Bq, Bp]
            scores = all_scores[offset // self.group_size:][:q.dense.shape[0]]  # [Bq, Bp]: this rank's rows
        labels = positive_labels(scores.shape[0], self.group_size, offset, scores.device)  # [Bq]
        temperature = self.temperature_for(scores)
        if everyone is None:
            contrastive = info_nce(scores, labels, temperature)
        else:  # the official loss: the mean over every rank's queries
            contrastive = info_nce(all_scores, positive_labels(all_scores.shape[0], self.group_size, 0,
                                                               scores.device), temperature)
        loss, distill = contrastive, torch.zeros((), device=scores.device)
        if teacher is not None:
            student = own_group(scores, labels, self.group_size)  # [Bq, G]
            distill = distill_kl(student, teacher.to(scores.device), temperature, self.teacher_temperature,
                                 self.kl_reduction)
            loss = distill + self.contrastive_loss_weight * contrastive
        accuracy = (scores.argmax(-1) == labels).float().mean()
        return BiEncoderOutput(loss, contrastive.detach(), distill.detach(), accuracy.detach(),
                               learning_share(scores.detach(), labels, temperature), scores.detach())

    def export(self, out_dir: str | Path, tokenizer) -> list[Path]:
        """Tied: one model in out_dir. Untied: out_dir/query and out_dir/passage. Returns the folders written."""
        out = Path(out_dir)
        if self.passage_encoder is None:
            self.query_encoder.save_pretrained(out, tokenizer)
            return [out]
        self.query_encoder.save_pretrained(out / "query", tokenizer)
        self.passage_encoder.save_pretrained(out / "passage", tokenizer)
        return [out / "query", out / "passage"]
