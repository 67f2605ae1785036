"""The DeepSpeed training loop: batches from `GroupSampler`, metrics (metrics.jsonl + the --report_to trackers,
TensorBoard by default: common/tracking.py; the run's provenance: common/provenance.py), checkpoints
that resume exactly (DeepSpeed model/optimizer/scheduler + data position + every rank's RNG, behind the crash-safe
`latest` of `common.checkpoint`), and the export."""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common.checkpoint import Checkpointer, resolve_resume, tag_for
from common.metrics_log import keep_steps_up_to
from common.precision import decide_deepspeed_bf16
from common.schedule import lr_factor, warmup_steps
from common.nonfinite import NonFiniteGuard, all_ranks_finite, backward_loss, require_skipping_engine
from common.provenance import record
from common.tracking import Tracking
from finetune.config import FinetuneConfig
from finetune.data import Collator, FinetuneData, GroupSampler, input_files
from finetune.model import BiEncoder
from finetune.teacher import TeacherScores, group_scores

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
EXPORT = "model"
METRICS = "metrics.jsonl"
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def deepspeed_config(cfg: FinetuneConfig, world_size: int, total_steps: int) -> dict:
    """The --deepspeed JSON with its "auto" values filled from the flags (the HF Trainer convention)."""
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such DeepSpeed config")
    raw = json.loads(path.read_text())
    decide_deepspeed_bf16(raw, cfg.bf16, str(path)).log(logger, "fine-tuning")  # bf16.enabled: the JSON's, or --bf16
    values = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size,
        "lr": cfg.learning_rate, "warmup_max_lr": cfg.learning_rate, "weight_decay": cfg.weight_decay,
        "total_num_steps": total_steps,
        "warmup_num_steps": max(1, warmup_steps(cfg.warmup_ratio, total_steps)),  # a JSON's own scheduler's
    }
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        given = raw.setdefault(key, "auto")
        if given not in ("auto", values[key]):
            raise ValueError(f"{path}: {key} is {given} but the flags give {values[key]}; set it to \"auto\"")

    def fill(node, where: str):
        if isinstance(node, dict):
            return {k: fill(v, f"{where}.{k}") if v != "auto" else _auto(k, where) for k, v in node.items()}
        return node

    def _auto(key: str, where: str):
        if key not in values:
            raise ValueError(f"{path}: {where}.{key} is \"auto\" but no flag sets it")
        return values[key]

    return fill(raw, path.name)


class Trainer:
    """Runs `BiEncoder` under DeepSpeed; every rank calls train(), rank 0 writes logs and the export."""

    def __init__(self, cfg: FinetuneConfig, model: BiEncoder, tokenizer, data: FinetuneData,
                 teacher: TeacherScores | None = None):
        import deepspeed

        self.cfg, self.tokenizer, self.data, self.teacher = cfg, tokenizer, data, teacher
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.output_dir)
        self.sampler = GroupSampler(data.groups, list(data.corpus), cfg.train_group_size,
                                    cfg.per_device_train_batch_size, self.rank, self.world_size, cfg.seed)
        self.collator = Collator(tokenizer, cfg.query_max_length, cfg.passage_max_length)
        per_epoch = self.sampler.steps_per_epoch // cfg.gradient_accumulation_steps
        if cfg.max_steps <= 0 and per_epoch == 0:
            raise ValueError(f"one epoch is {self.sampler.steps_per_epoch} micro-batches, fewer than "
                             f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps}")
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else per_epoch * cfg.num_train_epochs
        decay = [p for n, p in model.named_parameters() if not n.endswith(NO_DECAY)]
        no_decay = [p for n, p in model.named_parameters() if n.endswith(NO_DECAY)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        config = deepspeed_config(cfg, self.world_size, self.total_steps)
        scheduler = None  # a JSON without "scheduler" (ds_configs/finetune_*.json): HF Trainer's (common.schedule)
        if "scheduler" not in config:
            factor = functools.partial(lr_factor, warmup=warmup_steps(cfg.warmup_ratio, self.total_steps),
                                       total=self.total_steps, kind="linear")
            scheduler = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=factor)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=scheduler,
                                               config=config)
        require_skipping_engine(self.engine, cfg.deepspeed)
        self.guard = NonFiniteGuard(cfg.max_consecutive_nonfinite)
        self.position = (0, 0)  # (epoch, next micro-batch in it)
        self.checkpointer = Checkpointer(self.out / CHECKPOINTS, save_total_limit=None, rank=self.rank)
        found = resolve_resume(cfg.resume_from_checkpoint, self.checkpointer.dir, "--resume_from_checkpoint",
                               world_size=self.world_size)
        self.tracker_ids: dict = {}  # the tracker runs a resume of this run's own checkpoint continues
        if found is not None:
            self._load(*found)
        if self.rank == 0:
            keep_steps_up_to(self.out / METRICS, self.engine.global_steps)  # steps logged past the checkpoint
        provenance = record(self.rank, self.out, self.engine.global_steps, config=asdict(cfg),
                            deepspeed=self.engine.config, world_size=self.world_size,
                            data_files=input_files(cfg.data_dir, cfg.qrels_split, cfg.negatives, cfg.teacher_scores))
        self.tracking = Tracking.start(cfg.report_to, rank=self.rank, output_dir=self.out,
                                       tensorboard_dir=self.out / "runs", run_name=cfg.run_name,
                                       resume_step=self.engine.global_steps, ids=self.tracker_ids,
                                       provenance=provenance)

    def train(self) -> Path | None:
        """Train to total_steps; returns the export folder on rank 0 (None elsewhere)."""
        engine, cfg = self.engine, self.cfg
        engine.train()
        sums = torch.zeros(6)  # loss, contrastive, distill, accuracy, learning share, micro-batches since the last log
        start = time.time()
        bar = tqdm(total=self.total_steps, initial=engine.global_steps, desc="fine-tune", disable=self.rank != 0)
        epoch, step = self.position
        finite = True  # every loss of this optimizer step on this rank
        while engine.global_steps < self.total_steps:
            if step == self.sampler.steps_per_epoch:
                epoch, step = epoch + 1, 0
            batch = self.sampler.batch(epoch, step)
            query, passage = self.collator([self.data.queries[q] for q, _ in batch],
                                           [self.data.corpus[p] for _, ids in batch for p in ids])
            teacher = None if self.teacher is None else group_scores(self.teacher, batch)  # [B, G]
            output = engine(*({k: v.to(engine.device) for k, v in part.items()} for part in (query, passage)),
                            teacher)
            engine.backward(backward_loss(output.loss))  # a NaN/inf loss makes the engine skip the step
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            step += 1
            sums += torch.tensor([output.loss.item(), output.contrastive.item(), output.distill.item(),
                                  output.accuracy.item(), output.learning.item(), 1.0])
            finite = finite and math.isfinite(output.loss.item())
            if not boundary:
                continue
            bar.update(1)
            self.position = (epoch, step)
            global_step = engine.global_steps
            skipped = self.guard.after_step(engine, global_step, all_ranks_finite(finite, engine.device))
            finite = True
            if global_step % cfg.logging_steps == 0 or global_step == self.total_steps or skipped:
                self._log(global_step, epoch, sums, time.time() - start)
                sums.zero_()
            self.guard.stop_if_exhausted(global_step)
            if global_step % cfg.save_steps == 0 or global_step == self.total_steps:
                self._save(global_step)
        bar.close()
        self.tracking.close()
        if self.rank != 0:
            return None
        export = self.out / EXPORT
        module = engine.module
        if engine.bfloat16_enabled() or engine.fp16_enabled():  # the fp32 masters, not the bf16/fp16 working copy
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.checkpointer.dir),
                                                             tag=tag_for(engine.global_steps))
            module = copy.deepcopy(module).float()
            module.load_state_dict(state)
        folders = module.export(export, self.tokenizer)
        logger.info("exported %s", ", ".join(map(str, folders)))
        return export

    def _log(self, step: int, epoch: int, sums: torch.Tensor, seconds: float) -> None:
        totals = sums.to(self.engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(totals)  # every rank's loss / accuracy sums and micro-batch counts
        loss, contrastive, distill, accuracy, learning = (totals[:5] / totals[5]).tolist()
        if self.rank != 0:
            return
        record = {"step": step, "epoch": epoch, "loss": loss, "contrastive": contrastive, "distill": distill,
                  "accuracy": accuracy, "learning_queries": learning,
                  "lr": self.engine.get_lr()[0], "skipped_steps": self.guard.skipped, "seconds": round(seconds, 2)}
        with open(self.out / METRICS, "a") as out:
            out.write(json.dumps(record) + "\n")
        self.tracking.log(record)
        logger.info("step %d/%d epoch %d loss %.4f accuracy %.3f learning queries %.2f lr %.2e", step,
                    self.total_steps, epoch, loss, accuracy, learning, record["lr"])

    def _save(self, step: int) -> None:
        """DeepSpeed state + data position and skip count (train state) + this rank's RNG states (its own file)."""
        epoch, micro = self.position
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        self.checkpointer.save(self.engine, step, {"epoch": epoch, "micro_step": micro, "world_size": self.world_size,
                                                   "nonfinite": self.guard.state_dict(),
                                                   "trackers": self.tracking.ids()}, rank_state=rng)

    def _load(self, load_dir: Path, tag: str) -> None:
        rng = self.checkpointer.load_rank_state(load_dir, tag)
        state = self.checkpointer.load(self.engine, load_dir, tag)  # its world size: checked in resolve_resume
        self.position = (state["epoch"], state["micro_step"])
        self.guard.load_state_dict(state["nonfinite"])
        if load_dir.resolve() == self.checkpointer.dir.resolve():  # this run's own: continue its tracker runs
            self.tracker_ids = state.get("trackers", {})
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", load_dir / tag, self.engine.global_steps,
                    *self.position)
