"""Typed configs of pre-training and the DeepSpeed JSON they complete.

Every option is a dataclass field with a one-line help, settable on the command line (HF TrainingArguments
names) or in one YAML/JSON file given with `--config FILE` (command-line flags override the file). The
DeepSpeed JSON's "auto" fields are filled from the flags, so the data loader, the learning-rate schedule and
DeepSpeed never disagree about batch sizes.

    deepspeed pretrain/main.py --config run.yaml --output_dir OUT --max_steps 1000
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common import schedule
from common.precision import bf16_field, decide_deepspeed_bf16, parse_bf16
from common.tracking import report_to_field, resolve_report_to
from pretrain.collator import CollatorConfig
from pretrain.modeling import DupMAEConfig
from pretrain.retrieval_probe import ProbeConfig

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An option or option combination that cannot work; raised before any training."""


def _arg(default, help: str):
    """A dataclass field with its one-line --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _arg(
        "default", "HF model name or folder; 'default' = the packaged all-MiniLM-L6-v2")
    config_overrides: str | None = _arg(
        None, "e.g. 'hidden_size=32,num_hidden_layers=2': random init from the modified config")
    model_config: str | None = _arg(None, "a model config JSON: random init from it (instead of pretrained weights)")
    tokenizer_name: str | None = _arg(None, "tokenizer name or folder; defaults to --model_name_or_path")
    init_head_bias: Literal["unigram", "zero"] = _arg(
        "unigram", "output bias of an MLM head this run initializes (a model without one, or random init): the "
                   "shards' log unigram frequencies, or 0 (transformers' init)")


@dataclass
class DataArguments:
    data_dir: str | None = _arg(None, "folder of pre-training Arrow shards with a manifest.json (preprocessing output)")
    verify_shards: bool = _arg(True, "hash every shard against manifest.json before the first step, split across "
                                     "ranks, once per output_dir (--no_verify_shards: size and schema only)")

    def __post_init__(self):
        if not self.data_dir:
            raise ConfigError("--data_dir is required (a folder written by preprocessing.pretrain_data)")


@dataclass
class TrainingArguments:
    output_dir: str | None = _arg(None, "run folder: checkpoints/, metrics.jsonl, tensorboard/, provenance/, export/")
    deepspeed: str | None = _arg(
        None, "DeepSpeed JSON (ds_configs/zero2.json); its \"auto\" fields come from these flags")
    per_device_train_batch_size: int = _arg(8, "blocks per micro-batch on each rank")
    gradient_accumulation_steps: int = _arg(1, "micro-batches per optimizer step")
    learning_rate: float = _arg(1e-4, "peak AdamW learning rate")
    encoder_learning_rate: float | None = _arg(
        None, "peak learning rate of the pretrained encoder (embeddings and layers) when lower than the new parts' "
              "(MLM head, decoder); None: --learning_rate")
    freeze_encoder_steps: int = _arg(
        0, "first N steps train only the new parts (encoder without autograd); the encoder then warms up and decays "
           "over the remaining steps")
    weight_decay: float = _arg(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    adam_beta1: float = _arg(0.9, "AdamW beta1")
    adam_beta2: float = _arg(0.999, "AdamW beta2")
    adam_epsilon: float = _arg(1e-8, "AdamW epsilon")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm (0 disables)")
    num_train_epochs: float = _arg(1.0, "epochs over the shards when --max_steps is not set (an epoch: its whole "
                                        "optimizer steps, as HF Trainer; the run's last micro-batches go unread)")
    max_steps: int = _arg(-1, "optimizer steps in total (overrides --num_train_epochs when > 0)")
    lr_scheduler_type: Literal["linear", "cosine"] = _arg("linear", "decay after warm-up")
    warmup_ratio: float = _arg(0.1, "warm-up steps as a fraction of all steps (when --warmup_steps is 0)")
    warmup_steps: int = _arg(0, "warm-up steps (overrides --warmup_ratio when > 0)")
    logging_steps: int = _arg(10, "log metrics every N optimizer steps")
    save_steps: int = _arg(500, "checkpoint every N optimizer steps (0: only at the end and on preemption)")
    save_total_limit: int | None = _arg(None, "keep only the last K checkpoints")
    seed: int = _arg(42, "seed of shuffling, masks and dropout (each derived from seed, rank, step)")
    bf16: str = bf16_field("bf16 mixed precision: auto (bf16 where the device has native bf16, else fp32; "
                           "common.precision), true, false; fills bf16.enabled when the DeepSpeed JSON says auto")
    fp16: bool = _arg(False, "fp16 mixed precision (fills fp16.enabled when the DeepSpeed JSON says auto)")
    resume: str | None = _arg(None, "'auto': continue from OUT/checkpoints/latest if present; or a checkpoint folder")
    stop_at_step: int | None = _arg(None, "checkpoint and exit at this step without changing the --max_steps schedule")
    max_consecutive_nonfinite: int = _arg(
        20, "stop (exit 3) after this many optimizer steps in a row skipped for a NaN/inf loss or gradient norm "
            "(fp16's loss-scale search at the start skips a few; they count)")
    ddp_timeout: int = _arg(
        1800, "seconds every rank waits in a collective for the others; past it (a hung rank) every rank exits "
              "non-zero with one line naming the collective")
    disable_tqdm: bool = _arg(False, "no progress bar")
    report_to: list[str] = report_to_field("OUT/tensorboard/")
    run_name: str | None = _arg(None, "the tracker runs' name (--report_to wandb/mlflow); None: the output folder's")
    local_rank: int = _arg(-1, "set by the deepspeed launcher; ranks are read from the environment")

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("--output_dir is required")
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                    "max_consecutive_nonfinite", "ddp_timeout")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set --max_steps > 0 or --num_train_epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        try:
            self.bf16 = parse_bf16(self.bf16)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.report_to = resolve_report_to(self.report_to)  # TrackerError (a ValueError): unknown or not installed
        if self.bf16 == "true" and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"--stop_at_step must be >= 1, got {self.stop_at_step}")
        if self.encoder_learning_rate is not None and not 0 <= self.encoder_learning_rate <= self.learning_rate:
            raise ConfigError(f"--encoder_learning_rate must be in [0, --learning_rate {self.learning_rate}], got "
                              f"{self.encoder_learning_rate}")
        if self.save_steps < 0 or self.warmup_steps < 0 or self.freeze_encoder_steps < 0:
            raise ConfigError("--save_steps, --warmup_steps and --freeze_encoder_steps must be >= 0")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            raise ConfigError(f"--deepspeed {self.deepspeed}: no such file")

    def total_steps(self, steps_per_epoch: float) -> int:
        """Optimizer steps of the whole schedule (what --stop_at_step never changes). `steps_per_epoch`: micro-batches
        per epoch over --gradient_accumulation_steps. As HF Trainer, an epoch is its whole optimizer steps (floor),
        so N epochs never read into epoch N + 1's order (a fraction of an epoch rounds up to a whole step). The
        loader counts micro-batches across epochs, so a step may span two epochs, and the micro-batches not
        trained on are the last epoch's final ones (N x the remainder). An epoch shorter than one optimizer step
        still makes one."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * math.floor(steps_per_epoch)))

    @property
    def encoder_lr_ratio(self) -> float:
        """The encoder's peak learning rate over the new parts'."""
        if self.encoder_learning_rate is None:
            return 1.0
        return self.encoder_learning_rate / self.learning_rate

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps > 0 else schedule.warmup_steps(self.warmup_ratio, total_steps)


@dataclass
class Arguments:
    model: ModelArguments
    data: DataArguments
    collator: CollatorConfig
    loss: DupMAEConfig
    training: TrainingArguments
    probe: ProbeConfig


_GROUPS = (ModelArguments, DataArguments, CollatorConfig, DupMAEConfig, TrainingArguments, ProbeConfig)


def _load_config_file(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return values


def parse_args(argv: list[str] | None = None) -> Arguments:
    """Parse `--config FILE` (optional) then the flags; a bad option raises ConfigError (one line)."""
    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(_GROUPS, description="DupMAE pre-training; --config FILE (YAML/JSON) sets defaults")
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of these options")
    if known.config:
        try:
            values = _load_config_file(known.config)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--config {known.config}: {exc}") from None
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(f"--config {known.config}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**values)
    try:
        groups = parser.parse_args_into_dataclasses(rest)
    except (TypeError, ValueError) as exc:  # __post_init__ of the other stages' configs
        raise ConfigError(str(exc)) from None
    return Arguments(*groups[: len(_GROUPS)])


# DeepSpeed JSON keys filled from flags: (path in the JSON, function of args and world size).
def _ds_fields(args: TrainingArguments, world_size: int, total_steps: int) -> dict[str, object]:
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": args.max_grad_norm,
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": [args.adam_beta1, args.adam_beta2],
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
        "scheduler.params.warmup_max_lr": args.learning_rate,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_num_steps": args.warmup(total_steps),
        "scheduler.params.total_num_steps": total_steps,
    }


#: Keys whose explicit JSON value must equal the flags: the data loader and the schedule rely on them.
_MUST_AGREE = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def deepspeed_config(args: TrainingArguments, world_size: int, total_steps: int) -> dict:
    """The DeepSpeed JSON (or ZeRO-2 defaults) with every "auto" filled; any "auto" left is a ConfigError."""
    if args.deepspeed:
        try:
            config = json.loads(Path(args.deepspeed).read_text())
        except ValueError as exc:
            raise ConfigError(f"--deepspeed {args.deepspeed}: invalid JSON: {exc}") from None
    else:
        config = {"zero_optimization": {"stage": 2}}
    config.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    for path, value in _ds_fields(args, world_size, total_steps).items():
        *parents, key = path.split(".")
        node = config
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict):
            continue  # e.g. no "optimizer" section: our AdamW is used
        if node.get(key, "auto" if not parents else None) == "auto":  # top-level keys are also filled when absent
            node[key] = value
        elif path in _MUST_AGREE and node[key] != value:
            raise ConfigError(f"--deepspeed {args.deepspeed}: {path}={node[key]} disagrees with the flags ({value})")
    section = config.setdefault("fp16", {"enabled": args.fp16})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = args.fp16
    elif args.fp16 and not section["enabled"]:
        raise ConfigError(f"--deepspeed {args.deepspeed}: fp16.enabled is false but --fp16 was given")
    try:  # bf16.enabled: the JSON's true/false, else --bf16 (auto: common.precision's rule for this device)
        choice = decide_deepspeed_bf16(config, args.bf16, f"--deepspeed {args.deepspeed or '(none)'}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    choice.log(logger, "pre-training")
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise ConfigError(f"--deepspeed {args.deepspeed}: bf16 and fp16 are both enabled")
    left = _auto_paths(config)
    if left:
        raise ConfigError(f"--deepspeed {args.deepspeed}: no flag fills {', '.join(left)}; set them in the JSON")
    return config


def _auto_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _auto_paths(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []
