"""The pre-training loop on a DeepSpeed engine: deterministic per-step randomness, agreed preemption, resume.

Every micro-batch's masks and dropout are seeded from (seed, rank, micro-batch number), so a run that stops,
checkpoints and resumes computes the same losses as one that never stopped. SIGUSR1/SIGTERM on any rank
set a flag that travels in the per-step all-reduce of the metrics; all ranks see it after the same step,
checkpoint together and exit 0 ("preempted at step N").

    deepspeed pretrain/main.py --deepspeed ds_configs/zero2.json --data_dir SHARDS --output_dir OUT ...
"""
from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.nonfinite import NonFiniteGuard, backward_loss
from pretrain.arguments import ConfigError, TrainingArguments, deepspeed_config
from common.checkpoint import Checkpointer, resolve_resume
from pretrain.data import Prefetcher, RankBatchLoader
from pretrain.metrics import MetricsWriter, StepReducer
from pretrain.retrieval_probe import RetrievalProbe
from common.schedule import lr_factor
from common.tracking import Tracking

logger = logging.getLogger(__name__)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixing several integers (SeedSequence avoids the correlations of seed + rank + step)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def encoder_lr_factor(step: int, *, freeze: int, ratio: float, warmup: int, total: int, kind: str) -> float:
    """The pretrained encoder's factor: 0 for the first `freeze` steps, then `ratio` x its own warm-up and decay
    over the remaining steps (a continued pre-training recipe: the new head learns before the encoder moves)."""
    if step < freeze:
        return 0.0
    return ratio * lr_factor(step - freeze, warmup=warmup, total=total - freeze, kind=kind)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """(pretrained encoder | new parts) x (decayed | not), empty groups dropped; each group's "encoder" key says
    which schedule it follows. Weight decay on matrices only: biases and LayerNorm parameters are not decayed
    (BERT's recipe). The encoder is `model.mlm.base_model` (embeddings included, so a tied MLM decoder is too)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    encoder = {id(p) for p in model.mlm.base_model.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if (id(p) in encoder) == in_encoder and (id(p) in exempt) == no_decay],
               "weight_decay": 0.0 if no_decay else weight_decay, "encoder": in_encoder}
              for in_encoder in (True, False) for no_decay in (False, True)]
    return [group for group in groups if group["params"]]


def _schedules(groups: list[dict], args: TrainingArguments, total_steps: int) -> list:
    """One LambdaLR factor per parameter group: the new parts follow --learning_rate's schedule, the encoder
    its frozen-then-scaled one."""
    new_parts = functools.partial(lr_factor, warmup=args.warmup(total_steps), total=total_steps,
                                  kind=args.lr_scheduler_type)
    freeze = min(args.freeze_encoder_steps, total_steps)
    encoder = functools.partial(encoder_lr_factor, freeze=freeze, ratio=args.encoder_lr_ratio,
                                warmup=args.warmup(total_steps - freeze), total=total_steps,
                                kind=args.lr_scheduler_type)
    return [encoder if group["encoder"] else new_parts for group in groups]


def build_engine(model: nn.Module, args: TrainingArguments, world_size: int, total_steps: int):
    """DeepSpeed engine with our AdamW and schedule unless the JSON brings its own optimizer/scheduler."""
    import deepspeed

    config = deepspeed_config(args, world_size, total_steps)
    own_schedule = args.freeze_encoder_steps > 0 or args.encoder_lr_ratio != 1.0
    if own_schedule and ("optimizer" in config or "scheduler" in config):
        raise ConfigError(f"--deepspeed {args.deepspeed}: --freeze_encoder_steps and --encoder_learning_rate need "
                          "the trainer's own AdamW and schedule; remove 'optimizer' and 'scheduler' from the JSON")
    groups = _param_groups(model, args.weight_decay)
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon)
    scheduler = None
    if "scheduler" not in config:
        scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR,
                                      lr_lambda=_schedules(groups, args, total_steps))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        model_parameters=None if optimizer else groups)
    return engine


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; read once per step. The handler only flips a bool (async-signal-safe)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.raised: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = signum


class Trainer:
    """Runs optimizer steps until the schedule ends, --stop_at_step, or an agreed preemption."""

    def __init__(self, engine, collator, loader: RankBatchLoader, args: TrainingArguments, *, rank: int,
                 world_size: int, total_steps: int, probe: RetrievalProbe | None = None):
        self.engine, self.collator, self.loader, self.args = engine, collator, loader, args
        self.probe = probe  # rank 0 only (None elsewhere): zero-shot retrieval every --eval_steps
        self.rank, self.world_size, self.total_steps = rank, world_size, total_steps
        self.step = 0
        self.guard = NonFiniteGuard(args.max_consecutive_nonfinite)
        self.checkpointer = Checkpointer(os.path.join(args.output_dir, "checkpoints"),
                                         save_total_limit=args.save_total_limit, rank=rank)
        self.checkpoint: tuple[Path, str] | None = None  # (folder, tag) holding the weights of self.step
        self.tracking = Tracking({})  # --report_to's runs: main.py starts them after resume()
        self.tracker_ids: dict = {}  # the resumed checkpoint's tracker runs, continued by main.py

    def resume(self) -> None:
        """Load --resume's checkpoint (if any): weights, optimizer, scheduler, step and loader position."""
        found = resolve_resume(self.args.resume, self.checkpointer.dir, world_size=self.world_size)
        if found is None:
            if self.args.resume:
                logger.info("no checkpoint in %s: starting fresh", self.checkpointer.dir)
            return
        state = self.checkpointer.load(self.engine, *found)
        self.checkpoint = found  # maybe another run's folder: the export reads it when no step is left to train
        if state["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {found[1]} was written by {state['world_size']} ranks, "
                              f"this run has {self.world_size}")
        if state["total_steps"] != self.total_steps:
            logger.warning("the schedule changed: checkpoint planned %d steps, this run %d", state["total_steps"],
                           self.total_steps)
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        self.guard.load_state_dict(state.get("nonfinite", self.guard.state_dict()))
        if found[0].resolve() == self.checkpointer.dir.resolve():  # this run's own: continue its tracker runs
            self.tracker_ids = state.get("trackers", {})

    def _train_state(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(), "world_size": self.world_size,
                "total_steps": self.total_steps, "nonfinite": self.guard.state_dict(),
                "trackers": self.tracking.ids()}

    def _make_batch(self, micro: int) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` of this rank, masks drawn from (seed, rank, micro): runs in the prefetch thread."""
        generator = torch.Generator().manual_seed(derived_seed(self.args.seed, self.rank, micro, 0))
        batch = self.collator(self.loader.read(micro), generator=generator)
        if self.engine.device.type == "cuda":
            batch = {key: value.pin_memory() for key, value in batch.items()}
        return batch

    def _micro_step(self, batches: Prefetcher, reducer: StepReducer) -> None:
        micro, batch = batches.next()
        torch.manual_seed(derived_seed(self.args.seed, self.rank, micro, 1))  # dropout
        self.engine.module.encoder_frozen = self.step < self.args.freeze_encoder_steps
        batch = {key: value.to(self.engine.device, non_blocking=True) for key, value in batch.items()}
        output = self.engine(**batch)
        self.engine.backward(backward_loss(output.loss))  # a NaN/inf loss makes the engine skip the step
        self.engine.step()  # DeepSpeed steps the optimizer and scheduler only at the accumulation boundary
        self.loader.consumed(micro)
        reducer.add(output, batch["attention_mask"])

    def train(self) -> str:
        """'finished' (schedule done), 'stopped' (--stop_at_step) or 'preempted'; a checkpoint exists for each."""
        stop_at = min(self.total_steps, self.args.stop_at_step or self.total_steps)
        flag = PreemptionFlag()
        writer = MetricsWriter(self.args.output_dir, enabled=self.rank == 0, resume_step=self.step,
                               total_steps=self.total_steps, disable_tqdm=self.args.disable_tqdm,
                               tracking=self.tracking)
        saved_at, outcome = (self.step or None), "finished"  # a resumed step is already on disk
        train_start = time.perf_counter()
        if self.probe is not None and self.step == 0:
            writer.log({"step": 0, **self.probe(self.engine.module.mlm)})
        window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
        self.engine.train()
        batches = Prefetcher(self._make_batch, start=self.loader.state.micro_batches)
        while self.step < stop_at:
            lr, encoder_lr = _group_lrs(self.engine)
            reducer = StepReducer()
            for _ in range(self.args.gradient_accumulation_steps):
                self._micro_step(batches, reducer)
            self.step += 1
            values, preempted = reducer.reduce(flag.raised is not None, self.engine.device)
            skipped = self.guard.after_step(self.engine, self.step, math.isfinite(values["loss"]))
            window_samples, window_tokens = window_samples + values.pop("samples"), window_tokens + values.pop("tokens")
            writer.advance()
            if self.step % self.args.logging_steps == 0 or self.step == stop_at or preempted or skipped:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                writer.log({"step": self.step, "epoch": round(self.loader.epoch(), 4), "lr": lr,
                            "encoder_lr": encoder_lr, **values,
                            "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                            "skipped_steps": self.guard.skipped,
                            "samples_per_s": window_samples / elapsed, "tokens_per_s": window_tokens / elapsed})
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
            self.guard.stop_if_exhausted(self.step)
            if self.probe is not None and self.step % self.probe.config.eval_steps == 0:
                probe_start = time.perf_counter()
                writer.log({"step": self.step, **self.probe(self.engine.module.mlm)})
                window_start += time.perf_counter() - probe_start  # throughput counts training time only
            if self.args.save_steps and self.step % self.args.save_steps == 0:
                self._save()
                saved_at = self.step
            if preempted:
                outcome = "preempted"
                break
        else:
            if self.step < self.total_steps:
                outcome = "stopped"
        batches.close()
        if saved_at != self.step:
            self._save()
        writer.close()
        if self.probe is not None:
            total = time.perf_counter() - train_start
            logger.info("retrieval probes took %.0f s of %.0f s (%.1f%%)", self.probe.seconds, total,
                        100 * self.probe.seconds / max(total, 1e-9))
        messages = {"preempted": "preempted at step %d", "stopped": "stopped at step %d (--stop_at_step)",
                    "finished": "finished training at step %d"}
        logger.info(messages[outcome], self.step)
        return outcome

    def _save(self) -> None:
        folder = self.checkpointer.save(self.engine, self.step, self._train_state())
        self.checkpoint = folder.parent, folder.name

    def export(self, model: nn.Module, tokenizer, out_dir: str) -> None:
        """Rank 0 writes OUT/export from the fp32 master weights of the last checkpoint (not bf16/fp16 copies)."""
        if self.rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            folder, tag = self.checkpoint
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
            model = model.float()
            model.load_state_dict(state)
            model.save_export(out_dir, tokenizer)
            logger.info("exported the encoder and the full model to %s", out_dir)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()


def _group_lrs(engine) -> tuple[float, float]:
    """(learning rate of the new parts, of the pretrained encoder) at this step (see `_param_groups`)."""
    by_kind = {bool(group.get("encoder")): group["lr"] for group in engine.optimizer.param_groups}
    return by_kind.get(False, by_kind.get(True)), by_kind.get(True, by_kind.get(False))


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)
