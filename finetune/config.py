"""Every fine-tuning option in one typed dataclass; flag names follow HF TrainingArguments where one exists."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.flags import optional_bool
from common.precision import bf16_field, parse_bf16
from common.tracking import report_to_field, resolve_report_to


def arg(default, help: str):
    """A dataclass field whose help text `HfArgumentParser` shows in --help."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Options of `finetune/main.py` (and the parts of `finetune.mine_negatives` it shares)."""

    # Model and representation
    model_name_or_path: str = arg("default", "HF / sentence-transformers / DupMAE folder; 'default' = packaged MiniLM")
    representation: Literal["cls", "mean", "dupmae"] | None = arg(
        None, "cls / mean pooling, or DupMAE dense + sparse; None: the model folder's own (representation.json or "
              "sentence-transformers modules), else cls")
    normalize: bool | None = optional_bool(
        "L2-normalize the dense part (cosine scores), as sentence-transformers models do; None: the model's")
    dense_dim: int | None = arg(None, "dupmae: output dim of the projection; None: the model's (384 for a plain BERT)")
    top_k: int | None = arg(None, "dupmae: vocabulary entries a passage keeps (in training as at search time); "
                                  "None: the model's / 384")
    sparse_weight: float | None = arg(
        None, "dupmae: weight of the sparse score beside the dense one; None: the model's")
    untie_encoders: bool = arg(False, "separate query and passage encoders (both start from the same weights)")
    # Data
    data_dir: str = arg("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or preprocessing output")
    qrels_split: str = arg("train", "BEIR folders: the qrels file qrels/<split>.tsv to train on")
    negatives: str | None = arg(None, "BEIR folders: JSONL {query_id, negatives: [ranked doc ids]} from mining")
    train_group_size: int = arg(8, "passages per query in a batch: 1 positive + (n - 1) sampled hard negatives")
    query_max_length: int = arg(32, "query tokens, [CLS]/[SEP] included")
    passage_max_length: int = arg(144, "passage tokens (title + text), [CLS]/[SEP] included")
    # Loss
    temperature: float | None = arg(
        None, "InfoNCE temperature (scores are divided by it); None: 0.05 for cosine scores (--normalize; for dupmae "
              "both halves), 1.0 for raw dense dot products, and for dupmae's raw logits unnormalized (the paper's) "
              "calibrated on the first batch: the mean per-query spread of the scores")
    cross_device_negatives: bool = arg(False, "score each query against the passages of every rank")
    official_cross_device: bool = arg(
        False, "with --cross_device_negatives: InfoNCE as the official BiEncoderModel computes it (every rank scores "
               "every rank's queries, the gathered ones without gradient): 1/world_size of the default's gradient, "
               "which is the gradient of the mean loss over all queries (docs/finetuning.md, parity)")
    # Distillation (finetune/teacher.py)
    teacher_scores: str | None = arg(
        None, "'qid did score' file(s), comma-separated (the official --teacher_score_files): adds KL(softmax(teacher "
              "/ --teacher_temperature) || softmax(student / --temperature)) over each query's group")
    teacher_temperature: float = arg(1.0, "the teacher's scores are divided by it before the softmax (official: 1)")
    kl_reduction: Literal["batchmean", "mean"] = arg(
        "batchmean", "the KL's average: 'batchmean' per query (the KL's own scale), or 'mean' over the Bq x G "
                     "entries, the official nn.KLDivLoss(reduction='mean'): 1/G of it")
    contrastive_loss_weight: float = arg(
        1.0, "with --teacher_scores: loss = KL + this x InfoNCE (the official name; its default is 1e-4); "
             "0 trains on the teacher alone")
    # Optimization
    deepspeed: str = arg("", "DeepSpeed JSON config; its 'auto' values are filled from these flags")
    bf16: str = bf16_field("bf16 mixed precision: auto (bf16 where the device has native bf16, else fp32; "
                           "common.precision), true, false; fills bf16.enabled unless the JSON sets it")
    output_dir: str = arg("", "checkpoints/, model/ (export), metrics.jsonl, runs/ (TensorBoard), provenance/, "
                              "dead_letter.jsonl")
    per_device_train_batch_size: int = arg(16, "queries per rank per micro-batch")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step")
    learning_rate: float = arg(2e-5, "peak learning rate (linear warm-up, then linear decay to 0)")
    weight_decay: float = arg(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    warmup_ratio: float = arg(0.1, "fraction of the optimizer steps spent warming up")
    num_train_epochs: int = arg(1, "passes over the training queries (ignored when max_steps > 0)")
    max_steps: int = arg(-1, "optimizer steps to run; > 0 overrides num_train_epochs")
    logging_steps: int = arg(10, "log loss / accuracy / lr every N optimizer steps")
    save_steps: int = arg(500, "checkpoint every N optimizer steps (and at the end)")
    seed: int = arg(42, "seeds model dropout, the query order and the negatives drawn each epoch")
    resume_from_checkpoint: str | None = arg(
        None, "'auto': output_dir/checkpoints/latest if present (else start fresh); or a checkpoint folder "
              "(output_dir/checkpoints/step-N)")
    max_consecutive_nonfinite: int = arg(20, "stop (exit 3) after this many optimizer steps in a row skipped for a "
                                             "NaN/inf loss or gradient norm")
    ddp_timeout: int = arg(1800, "seconds every rank waits in a collective for the others; past it (a hung rank) "
                                 "every rank exits non-zero with one line naming the collective")
    report_to: list[str] = report_to_field("OUT/runs/")
    run_name: str | None = arg(None, "the tracker runs' name (--report_to wandb/mlflow); None: the output folder's")
    local_rank: int = arg(-1, "set by the deepspeed launcher")

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ValueError("--data_dir is required")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        if not self.deepspeed:
            raise ValueError("--deepspeed is required (e.g. ds_configs/finetune_cpu.json)")
        self.bf16 = parse_bf16(self.bf16)
        self.report_to = resolve_report_to(self.report_to)  # TrackerError (a ValueError): unknown or not installed
        for name in ("train_group_size", "query_max_length", "passage_max_length", "per_device_train_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "max_consecutive_nonfinite",
                     "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if min(self.query_max_length, self.passage_max_length) < 3:
            raise ValueError("--query_max_length and --passage_max_length must leave room for [CLS] x [SEP] (>= 3)")
        for name in ("dense_dim", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.teacher_temperature <= 0 or self.contrastive_loss_weight < 0:
            raise ValueError("need --teacher_temperature > 0 and --contrastive_loss_weight >= 0")
        if self.official_cross_device and not self.cross_device_negatives:
            raise ValueError("--official_cross_device applies to --cross_device_negatives")
        if self.kl_reduction not in ("batchmean", "mean"):
            raise ValueError(f"--kl_reduction must be batchmean or mean, got {self.kl_reduction!r}")
        if self.teacher_scores and self.train_group_size < 2:
            raise ValueError("--teacher_scores needs --train_group_size >= 2 (the KL runs over each query's group)")
        if self.sparse_weight is not None and self.sparse_weight < 0:
            raise ValueError(f"--sparse_weight must be >= 0, got {self.sparse_weight}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("need --learning_rate > 0, --weight_decay >= 0 and 0 <= --warmup_ratio < 1")
        if self.max_steps <= 0 and self.num_train_epochs < 1:
            raise ValueError("set --max_steps > 0 or --num_train_epochs >= 1")
