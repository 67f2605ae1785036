"""Fine-tune an encoder into a retriever with InfoNCE over in-batch + hard (+ cross-device) negatives.

Launch (GPUs):  deepspeed finetune/main.py --deepspeed ds_configs/finetune_zero2.json \
                    --model_name_or_path pretrain_out/model --representation dupmae --data_dir data/msmarco \
                    --negatives negs.jsonl --train_group_size 8 --cross_device_negatives --output_dir ft_out
CPU, one process:  python finetune/main.py --deepspeed ds_configs/finetune_cpu.json ...  (gloo backend)
Writes output_dir/{model/ (export), checkpoints/step-N/, metrics.jsonl, runs/ (TensorBoard), dead_letter.jsonl}.
"""
from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch


def init_distributed() -> tuple[int, int]:
    """DeepSpeed's process group from the launcher's RANK/LOCAL_RANK/WORLD_SIZE; a plain `python main.py` is a world
    of one. On CPU, plain gloo: DeepSpeed's shared-memory all-reduce op would be compiled at start (minutes)."""
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    env = os.environ
    if env.setdefault("WORLD_SIZE", "1") == "1":
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    elif "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise SystemExit(f"error: WORLD_SIZE={env['WORLD_SIZE']} needs MASTER_ADDR and MASTER_PORT")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        env.setdefault(key, value)
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        accelerator.set_device(int(env["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    from common.logging_setup import setup_logging
    from common.tokenizer import load_tokenizer
    from finetune.config import FinetuneConfig
    from finetune.data import DeadLetter, load_finetune_data
    from finetune.model import BiEncoder
    from finetune.trainer import Trainer

    (cfg,) = HfArgumentParser(FinetuneConfig).parse_args_into_dataclasses(argv)
    rank, world_size = init_distributed()
    setup_logging(rank)
    logger = logging.getLogger("finetune.main")
    logger.info("fine-tuning on %d rank(s): %s", world_size, cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    dead_letter = DeadLetter(os.path.join(cfg.output_dir, "dead_letter.jsonl") if rank == 0 else None)
    data = load_finetune_data(cfg.data_dir, cfg.qrels_split, cfg.negatives, tokenizer, dead_letter)
    if dead_letter.count:
        logger.warning("%d malformed input record(s) skipped; see %s", dead_letter.count, dead_letter.path)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = BiEncoder.from_config(cfg)
    Trainer(cfg, model, tokenizer, data).train()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
