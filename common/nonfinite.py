"""Optimizer steps with a non-finite loss or gradient norm: skipped alike on every rank, counted, bounded.

A NaN/inf must never reach the weights, and every rank must make the same choice, or the ranks' replicas
drift apart. DeepSpeed's mixed-precision and ZeRO optimizers already skip a step whose gradients hold a
NaN/inf: the overflow flag is all-reduced, so every rank skips it, and the learning-rate scheduler does not
advance (fp16's loss-scale search uses the same path). The guard builds on that:
- `backward_loss` makes a non-finite loss produce NaN gradients (an inf loss can have finite ones), so the
  engine skips that step on every rank;
- `NonFiniteGuard.after_step` reads the engine's verdict, counts skipped steps (the count is checkpointed),
  and refuses a step that the engine applied although a loss or the gradient norm was not finite;
- `stop_if_exhausted` raises NonFiniteError after `max_consecutive` skips in a row, before any checkpoint of
  that step is written, so the last checkpoint stays the last good one;
- `check_finite_weights` runs before every checkpoint, so none ever holds a NaN/inf weight;
- `require_skipping_engine` refuses, at start, an engine that cannot skip (ZeRO stage 0 in fp32 steps a
  plain torch optimizer, which applies NaN gradients).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training cannot go on without non-finite numbers reaching the weights or a checkpoint."""


def backward_loss(loss: Tensor) -> Tensor:
    """The loss itself when finite, else loss × NaN: every gradient then holds NaN (no host sync)."""
    return loss * torch.where(torch.isfinite(loss), 1.0, math.nan)


def all_ranks_finite(finite: bool, device) -> bool:
    """Whether every rank's value was finite (one all-reduce of a flag; a world of one needs none)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return finite
    flag = torch.tensor([float(finite)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def require_skipping_engine(engine, config_name: str) -> None:
    """ValueError unless the engine's optimizer skips steps whose gradients are not finite."""
    if not hasattr(engine.optimizer, "overflow"):
        raise ValueError(f"--deepspeed {config_name}: this setup (ZeRO stage 0 without fp16/bf16) would apply a "
                         "step with NaN/inf gradients; set zero_optimization.stage to 1 or 2")


def check_finite_weights(module: nn.Module, what: str, device) -> None:
    """NonFiniteError on every rank if any rank's weights hold a NaN/inf (call on every rank before saving)."""
    bad = next((name for name, param in module.named_parameters() if not torch.isfinite(param).all()), None)
    if not all_ranks_finite(bad is None, device):
        raise NonFiniteError(f"not writing {what}: {bad or 'another rank'}'s weights hold NaN/inf; the last "
                             "checkpoint written is kept")


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm; stops after max_consecutive."""

    max_consecutive: int
    skipped: int = 0  # steps skipped so far in the run
    consecutive: int = 0  # skipped steps in a row up to the last step

    def after_step(self, engine, step: int, losses_finite: bool) -> bool:
        """Whether optimizer step `step` was skipped. losses_finite: every rank's losses of the step were finite
        (agreed across ranks, so every rank returns and raises alike)."""
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        norm_finite = norm is None or math.isfinite(norm)
        if engine.was_step_applied():
            if not (losses_finite and norm_finite):
                raise NonFiniteError(f"step {step}: the optimizer applied a step with a non-finite "
                                     f"{'loss' if not losses_finite else 'gradient norm'}; check the DeepSpeed "
                                     "config (bf16.check_grad_overflow must not be false)")
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        if not dist.is_initialized() or dist.get_rank() == 0:
            reason = "loss" if not losses_finite else f"gradient norm ({norm})"
            logger.warning("step %d: non-finite %s; optimizer step skipped on every rank (%d in a row, %d in all)",
                           step, reason, self.consecutive, self.skipped)
        return True

    def stop_if_exhausted(self, step: int) -> None:
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"stopping at step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss or "
                f"gradient norm (--max_consecutive_nonfinite {self.max_consecutive}); no checkpoint of this step is "
                "written, and every checkpoint on disk holds finite weights")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
