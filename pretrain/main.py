"""DupMAE pre-training entry point: parse, validate, build, train, export.

    deepspeed pretrain/main.py --deepspeed ds_configs/zero2.json --data_dir SHARDS \
        --model_name_or_path bert-base-uncased --output_dir OUT --per_device_train_batch_size 32 \
        --max_steps 100000 --save_steps 1000 --save_total_limit 3 --resume auto
    # also: torchrun --nproc_per_node 8 pretrain/main.py ...; srun (one task per process) python pretrain/main.py ...
    # CPU (gloo; bf16 works there too):
    #   DS_ACCELERATOR=cpu deepspeed --num_gpus 2 pretrain/main.py --deepspeed ds_configs/zero2.json ...

Outputs in OUT: checkpoints/ (step-N folders, `latest`), metrics.jsonl, tensorboard/ (--report_to: also W&B,
MLflow), provenance/step-N.json (options, DeepSpeed JSON, git, versions, hardware, data hash), export/ (the encoder
for AutoModel / sentence-transformers, plus the decoder). Exit 0 when finished, stopped (--stop_at_step) or
preempted (SIGUSR1/SIGTERM, after a checkpoint); exit 2 with one error line on bad options or data; exit 3
with one error line after --max_consecutive_nonfinite skipped steps in a row, or before a checkpoint would
hold a NaN/inf weight; exit 4 when a checkpoint does not fit or fails to write (a full disk); exit 5 when a
collective fails, e.g. a rank that stopped answering for --ddp_timeout seconds (see common/failures.py).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.host_allocator import configure_host_allocator

configure_host_allocator()  # before torch's first allocation, which reads the setting

import torch
import torch.distributed
from transformers import set_seed

from common.distributed import end_distributed, init_distributed
from common.shared_folder import check_shared_folder
from common.failures import exit_code
from common.nonfinite import require_skipping_engine
from common.logging_setup import setup_logging
from common.provenance import record
from common.tracking import Tracking
from common.shard_format import MANIFEST_NAME
from common.tokenizer import load_tokenizer, vocab_hash
from pretrain.arguments import ConfigError, parse_args
from common.checkpoint import read_latest
from pretrain.collator import DupMAECollator
from pretrain.data import PretrainShards, RankBatchLoader
from pretrain.modeling import DupMAEModel
from pretrain.retrieval_probe import RetrievalProbe
from pretrain.shard_integrity import verify_shards
from pretrain.trainer import Trainer, build_engine

logger = logging.getLogger("pretrain.main")


def build(argv: list[str] | None):
    """Everything up to the first step; any problem here is a one-line error, before training starts."""
    args = parse_args(argv)
    model_args, training = args.model, args.training
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    shards = PretrainShards(args.data.data_dir, vocab_hash=vocab_hash(tokenizer))
    if shards.manifest.max_seq_length > args.collator.max_seq_length:
        raise ConfigError(f"--max_seq_length {args.collator.max_seq_length} is below the shards' "
                          f"max_seq_length {shards.manifest.max_seq_length} ({args.data.data_dir}/manifest.json)")
    checkpoints = Path(training.output_dir) / "checkpoints"
    if training.resume is None and read_latest(checkpoints):
        raise ConfigError(f"{checkpoints} holds a run: pass --resume auto to continue it, or another --output_dir")
    rank, _, world_size = init_distributed(training.ddp_timeout)
    check_shared_folder(training.output_dir, rank, world_size)
    if args.data.verify_shards:
        verify_shards(args.data.data_dir, shards.manifest, training.output_dir, rank=rank, world_size=world_size)
    loader = RankBatchLoader(shards, batch_size=training.per_device_train_batch_size, rank=rank,
                             world_size=world_size, seed=training.seed)
    total_steps = training.total_steps(loader.batches_per_epoch / training.gradient_accumulation_steps)
    logger.info("%d blocks, %d ranks, %d micro-batches per epoch per rank, %d optimizer steps",
                shards.num_rows, world_size, loader.batches_per_epoch, total_steps)
    set_seed(training.seed)  # the same random init (new MLM head, decoder, --config_overrides) on every run
    model = DupMAEModel.from_pretrained(model_args.model_name_or_path, args.loss, model_args.config_overrides,
                                        model_args.model_config)
    if model.new_head and model_args.init_head_bias == "unigram":
        model.init_head_bias(torch.from_numpy(shards.log_unigram_prior(model.mlm.config.vocab_size)))
        logger.info("new MLM head: output bias set to the shards' log unigram frequencies")
    engine = build_engine(model, training, world_size, total_steps)
    require_skipping_engine(engine, training.deepspeed)
    probe = None
    if args.probe.eval_dataset and rank == 0:
        probe = RetrievalProbe(args.probe, tokenizer, model.representation, seed=training.seed)
    trainer = Trainer(engine, DupMAECollator.from_tokenizer(tokenizer, args.collator), loader, training,
                      rank=rank, world_size=world_size, total_steps=total_steps, probe=probe)
    trainer.resume()
    provenance = record(rank, training.output_dir, trainer.step, config=asdict(args), deepspeed=engine.config,
                        data_files={MANIFEST_NAME: Path(args.data.data_dir) / MANIFEST_NAME},
                        world_size=world_size)
    trainer.tracking = Tracking.start(training.report_to, rank=rank, output_dir=training.output_dir,
                                      tensorboard_dir=Path(training.output_dir) / "tensorboard",
                                      run_name=training.run_name, resume_step=trainer.step, ids=trainer.tracker_ids,
                                      provenance=provenance)
    return trainer, model, tokenizer


def main(argv: list[str] | None = None) -> int:
    setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    try:
        return train(argv)
    finally:
        end_distributed()


def train(argv: list[str] | None) -> int:
    """Build, train, export; the exit code for the faults a run ends on by design (see the module's docstring)."""
    try:
        trainer, model, tokenizer = build(argv)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, DataError, TokenizerError and model config errors
        logger.error("%s", exc)
        return 2
    try:
        if trainer.train() == "finished":
            trainer.export(model, tokenizer, os.path.join(trainer.args.output_dir, "export"))
    except RuntimeError as exc:  # NonFiniteError, CheckpointSaveError, a failed collective
        ending = exit_code(exc, trainer.args.ddp_timeout)
        if ending is None:
            raise
        logger.error("%s", ending[1])
        return ending[0]
    return 0


if __name__ == "__main__":
    sys.exit(main())
