"""The learning-rate schedule of pre-training and fine-tuning: HF Trainer's, step for step.

A LambdaLR factor: linear warm-up from 0 over `warmup` optimizer steps (HF's count: ceil(warmup_ratio x total)),
then linear or cosine decay to 0 at `total`, as transformers' get_linear/cosine_schedule_with_warmup give it.
DeepSpeed's WarmupDecayLR is not used: it starts its warm-up one optimizer step later (lr 0 at steps 1 and 2,
then a step behind HF's throughout), which the fine-tuning parity benchmark measured against the official code
(docs/finetuning.md#parity-with-the-official-code).
"""
from __future__ import annotations

import math


def warmup_steps(warmup_ratio: float, total: int) -> int:
    """HF TrainingArguments.get_warmup_steps for a ratio."""
    return math.ceil(warmup_ratio * total)


def lr_factor(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up from 0, then linear or cosine decay to 0 at `total`: the factor of optimizer step `step`
    (0-based), exactly as HF Trainer's get_linear/cosine_schedule_with_warmup give it (step 0 at lr 0 when
    warming up), so a run here follows the official recipe's learning rates step for step."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
