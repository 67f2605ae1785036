"""Fine-tune an encoder into a retriever with InfoNCE over in-batch + hard (+ cross-device) negatives, and
optionally a KL term to a teacher's scores (--teacher_scores; finetune/teacher.py).

Launch (GPUs):  deepspeed finetune/main.py --deepspeed ds_configs/finetune_zero2.json \
                    --model_name_or_path pretrain_out/model --representation dupmae --data_dir data/msmarco \
                    --negatives negs.jsonl --train_group_size 8 --cross_device_negatives --output_dir ft_out
CPU, one process:  python finetune/main.py --deepspeed ds_configs/finetune_cpu.json ...  (gloo backend)
Writes output_dir/{model/ (export), checkpoints/step-N/, metrics.jsonl, runs/ (TensorBoard; --report_to: also W&B,
MLflow), provenance/step-N.json (options, DeepSpeed JSON, git, versions, hardware, data hashes), dead_letter.jsonl}.
Exit 3 with one error line after --max_consecutive_nonfinite optimizer steps in a row were skipped for a NaN/inf
loss or gradient norm, or before a checkpoint would hold a NaN/inf weight; exit 4 when a checkpoint does not fit or
fails to write (a full disk); exit 5 when a collective fails, e.g. a rank hung for --ddp_timeout seconds; exit 2
with one error line when --resume_from_checkpoint names a checkpoint of another number of ranks.
"""
from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from common.distributed import end_distributed

    try:
        return train(argv)
    finally:
        end_distributed()


def train(argv: list[str] | None) -> int:
    """Parse, build, train; the exit code for the faults a run ends on by design (see the module's docstring)."""
    from transformers import HfArgumentParser

    from common.checkpoint import ResumeWorldSizeError
    from common.distributed import DistributedSetupError, init_distributed
    from common.logging_setup import setup_logging
    from common.failures import exit_code
    from common.shared_folder import check_shared_folder
    from common.tracking import TrackerError
    from common.tokenizer import load_tokenizer
    from finetune.config import FinetuneConfig
    from finetune.data import DeadLetter, load_finetune_data
    from finetune.model import BiEncoder
    from finetune.teacher import check_coverage, read_teacher_scores
    from finetune.trainer import Trainer

    try:
        (cfg,) = HfArgumentParser(FinetuneConfig).parse_args_into_dataclasses(argv)
    except TrackerError as exc:  # a --report_to tracker that is not installed: one line, before any work
        setup_logging()
        logging.getLogger("finetune.main").error("%s", exc)
        return 2
    setup_logging()  # the launcher's RANK: each rank's rendezvous line comes before the group exists
    logger = logging.getLogger("finetune.main")
    try:  # an unresolvable MASTER_ADDR, an output folder the ranks do not share: one line, before any step
        rank, _, world_size = init_distributed(cfg.ddp_timeout)
        os.makedirs(cfg.output_dir, exist_ok=True)
        check_shared_folder(cfg.output_dir, rank, world_size)
    except DistributedSetupError as exc:
        logger.error("%s", exc)
        return 2
    setup_logging(rank)
    logger.info("fine-tuning on %d rank(s): %s", world_size, cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    dead_letter = DeadLetter(os.path.join(cfg.output_dir, "dead_letter.jsonl") if rank == 0 else None)
    data = load_finetune_data(cfg.data_dir, cfg.qrels_split, cfg.negatives, tokenizer, dead_letter)
    if dead_letter.count:
        logger.warning("%d malformed input record(s) skipped; see %s", dead_letter.count, dead_letter.path)
    teacher = None
    if cfg.teacher_scores:
        teacher = read_teacher_scores(cfg.teacher_scores)
        check_coverage(teacher, data.groups, data.corpus)
        logger.info("distilling from %s: %d queries' teacher scores", cfg.teacher_scores, len(teacher))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = BiEncoder.from_config(cfg)
    try:
        trainer = Trainer(cfg, model, tokenizer, data, teacher)
    except (ResumeWorldSizeError, TrackerError) as exc:  # one line, no traceback, before any step
        logger.error("%s", exc)
        return 2
    try:
        trainer.train()
    except RuntimeError as exc:  # NonFiniteError, CheckpointSaveError, a failed collective
        ending = exit_code(exc, cfg.ddp_timeout)
        if ending is None:
            raise
        logger.error("%s", ending[1])
        return ending[0]
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
