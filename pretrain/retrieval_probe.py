"""Zero-shot retrieval of the model being pre-trained, every --eval_steps: the signal for when to stop.

Pre-training losses keep falling long after retrieval stops improving (or while it gets worse: a new MLM head's
early gradients can wreck a trained embedder), so rank 0 searches a small, fixed sample of a BEIR dataset
(`evaluation.data.subsample`: seeded queries, their judged documents and random others) with every
representation the model has: `cls` and `mean` pooling (cosine) and the `dupmae` representation its export will
record, scored by `evaluation.compare` (one encoder pass per batch serves all three).
The other ranks wait at the next step's all-reduce. Scores on the sample are higher than on the whole corpus
(fewer distractors) but compare across steps.

    deepspeed pretrain/main.py ... --eval_dataset ../shared/data/scifact --eval_steps 50
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from common.representation import Encoder, RepresentationConfig, new_projection

logger = logging.getLogger(__name__)

METRICS = ("nDCG@10", "Recall@100")


@dataclass
class ProbeConfig:
    """Options of the in-training retrieval evaluation."""

    eval_dataset: str | None = field(
        default=None, metadata={"help": "BEIR folder searched zero-shot every --eval_steps (None: no evaluation)"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N optimizer steps, and before the first"})
    eval_split: str = field(default="test", metadata={"help": "qrels split of --eval_dataset (qrels/SPLIT.tsv)"})
    eval_max_queries: int = field(default=200, metadata={"help": "queries sampled from the split (0: all)"})
    eval_max_docs: int = field(
        default=1000, metadata={"help": "documents: the sampled queries' judged ones plus random others (0: all)"})
    eval_max_length: int = field(default=128, metadata={"help": "tokens per document (queries: 64)"})

    def __post_init__(self) -> None:
        if self.eval_dataset and self.eval_steps < 1:
            raise ValueError("--eval_dataset needs --eval_steps >= 1")
        for name in ("eval_steps", "eval_max_queries", "eval_max_docs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_max_length < 3:
            raise ValueError(f"--eval_max_length must be >= 3, got {self.eval_max_length}")


class RetrievalProbe:
    """Loads and samples the dataset once; each call scores the model as it is now."""

    QUERY_MAX_LENGTH = 64

    def __init__(self, config: ProbeConfig, tokenizer, representation: RepresentationConfig, seed: int):
        from evaluation.data import load_beir, subsample

        self.config, self.tokenizer, self.representation = config, tokenizer, representation
        self.data = subsample(load_beir(config.eval_dataset, config.eval_split), config.eval_max_queries,
                              config.eval_max_docs, seed)
        self.seconds = 0.0
        logger.info("retrieval probe: %s %s, %d queries, %d documents, every %d steps", self.data.name,
                    config.eval_split, len(self.data.query_ids), len(self.data.doc_ids), config.eval_steps)

    def encoders(self, mlm: nn.Module) -> dict[str, Encoder]:
        """The representations the model supports, sharing its network (a fresh, untrained dupmae projection)."""
        projection = new_projection(mlm.config.hidden_size, self.representation.dense_dim)
        projection.to(device=mlm.device, dtype=mlm.dtype)
        return {"cls": Encoder(mlm, RepresentationConfig(kind="cls", normalize=True)),
                "mean": Encoder(mlm, RepresentationConfig(kind="mean", normalize=True)),
                "dupmae": Encoder(mlm, replace(self.representation, kind="dupmae"), projection)}

    @torch.no_grad()
    def __call__(self, mlm: nn.Module) -> dict[str, float]:
        """{"eval/<representation>/<metric>": value} for the current weights, plus "eval_seconds"."""
        from evaluation.compare import score_representations

        start = time.perf_counter()
        was_training = mlm.training
        scores = score_representations(self.encoders(mlm), self.tokenizer, self.data,
                                       max_length=self.config.eval_max_length, query_max_length=self.QUERY_MAX_LENGTH)
        mlm.train(was_training)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return {**{f"eval/{name}/{metric}": values[metric] for name, values in scores.items() for metric in METRICS},
                "eval_seconds": seconds}
