"""Training metrics: one all-reduce per step, then OUT/metrics.jsonl, the --report_to trackers (TensorBoard by
default; common/tracking.py) and a progress bar on rank 0.

Each logged line is the state of one optimizer step (not a window average), so a resumed run logs exactly
the numbers an uninterrupted run logs; resuming drops lines past the checkpoint's step first, so the file
never holds a step twice.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from common.metrics_log import keep_steps_up_to
from common.tracking import Tracking

logger = logging.getLogger(__name__)

#: Fields of the model's output dataclass that are averaged over micro-batches and ranks.
LOSS_FIELDS = ("loss", "mlm_loss", "decoder_loss", "bow_loss", "mlm_accuracy", "decoder_accuracy", "bow_recall")


class StepReducer:
    """Sums a step's micro-batch outputs locally; `reduce` averages them over ranks in a single all-reduce,
    carrying the preemption flag and the sample/token counts in the same tensor."""

    def __init__(self):
        self.sums = torch.zeros(len(LOSS_FIELDS), dtype=torch.float64)
        self.micro = 0
        self.samples = 0
        self.tokens = 0

    def add(self, output, attention_mask: torch.Tensor) -> None:
        values = [getattr(output, name).detach().float().cpu() for name in LOSS_FIELDS]
        self.sums += torch.stack(values).double()
        self.micro += 1
        self.samples += attention_mask.shape[0]
        self.tokens += int(attention_mask.sum())

    def reduce(self, stop_flag: bool, device) -> tuple[dict[str, float], bool]:
        """(mean metrics and total samples/tokens over ranks, whether any rank asked to stop)."""
        packed = torch.cat([self.sums / max(1, self.micro),
                            torch.tensor([self.samples, self.tokens, float(stop_flag)], dtype=torch.float64)])
        world = 1
        if dist.is_initialized():
            world = dist.get_world_size()
            packed = packed.to(device)
            dist.all_reduce(packed)
            packed = packed.cpu()
        values = {name: packed[i].item() / world for i, name in enumerate(LOSS_FIELDS)}
        values["samples"], values["tokens"] = int(packed[-3]), int(packed[-2])
        return values, packed[-1].item() > 0


class MetricsWriter:
    """Rank 0 writes; other ranks hold a disabled writer so callers need no rank checks."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int, total_steps: int,
                 disable_tqdm: bool, tracking: Tracking):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tracking = tracking
        self.bar = None
        if not enabled:
            return
        keep_steps_up_to(self.path, resume_step)  # a crash may have logged steps past the checkpoint
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=resume_step, desc="pre-training", unit="step",
                        dynamic_ncols=True, disable=disable_tqdm)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.tracking.log(record)
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tracking.close()
