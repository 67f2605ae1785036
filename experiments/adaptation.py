"""Continued (domain-adaptive) pre-training of an existing encoder on a target corpus, against the same budget
without it: the stages of one experiment, shared by `benchmarks/adaptation.py` (every variant, several datasets and
seeds) and the demo (none against dupmae on the docstring set).

Variants, all from the same base model with the same pre-training budget (steps, batch, length, corpus, seed)
and the same continued-pre-training recipe (`--freeze_encoder_steps`, learning rates; see the README):
  none             the base model as it is
  mlm              MLM only (--decoder_weight 0 --bow_weight 0: no decoder is built, no BoW branch)
  retromae         MLM + [CLS] decoding (--bow_weight 0)
  dupmae           MLM + [CLS] decoding + BoW, the paper's weights 1/1/1
  dupmae-official  the official code's loss (--objective official: BoW weight 0.1, masked tokens and [SEP] pooled,
                   target 1/n per unique token)
Each variant is scored zero-shot with `mean` and `cls` pooling (cosine) and, for the DupMAE variants, the `dupmae`
representation its export records; then, where the dataset has qrels/train.tsv, fine-tuned the same way for every
variant (BM25 negatives mined once; same steps, seed and options; the base model's own embedding, `mean`), and
scored the same way again (a DupMAE variant's `dupmae`: the tuned dense half plus its pre-trained sparse half,
with the same representation config as its zero-shot row, scored from a folder that holds both: `with_sparse_half`,
so the row's artifact reproduces it in this code and in sentence-transformers; `Experiment.models` names each).
Every stage is a subprocess with its own log, reused when its command and inputs are unchanged
(`experiments.stages`); evaluations are cached by their options and a fingerprint of the model's weights. The base
model's row fused with BM25 by reciprocal rank is a reference row.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.defaults import resolve_model
from common.representation import RepresentationConfig
from experiments.scoring import dupmae_representation, evaluate_model
from experiments.stages import Stage, fingerprint, run_stage
from experiments.variants import VARIANTS, Variant

logger = logging.getLogger(__name__)


@dataclass
class AdaptationConfig:
    """The experiment's options; the pre-training ones are `pretrain/main.py`'s flags of the same names."""

    output_dir: str
    datasets: list[str] = field(default_factory=list)  # BEIR folders; empty: ../shared SciFact + the docstring set
    corpus: list[str] = field(default_factory=list)  # adaptation corpus (BEIR folders or JSONL); empty: own corpus
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: int = 1
    model_name_or_path: str = "default"
    # continued pre-training (the recipe the README documents for adapting an existing encoder)
    max_steps: int = 100
    per_device_train_batch_size: int = 16
    max_seq_length: int = 128
    learning_rate: float = 3e-3
    encoder_learning_rate: float = 5e-6
    freeze_encoder_steps: int = 100  # >= max_steps: the encoder never moves (what measured best, see the README)
    # evaluation
    max_length: int = 128  # document tokens at evaluation (queries: 64)
    max_eval_docs: int = 0  # 0: the whole corpus; else the test queries' judged documents plus random others
    # fine-tuning
    finetune_steps: int = 30
    finetune_batch_size: int = 16
    finetune_learning_rate: float = 5e-5
    pretrain_extra: tuple[str, ...] = ()  # more pretrain/main.py flags (the demo's retrieval probe)

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if "none" not in self.variants:
            self.variants = ("none", *self.variants)  # every line's baseline
        if self.seeds < 1 or self.max_steps < 1 or self.finetune_steps < 1:
            raise ValueError("--seeds, --max_steps and --finetune_steps must be >= 1")

    def pretrain_flags(self) -> list[str]:
        return ["--max_steps", str(self.max_steps), "--per_device_train_batch_size",
                str(self.per_device_train_batch_size), "--max_seq_length", str(self.max_seq_length),
                "--learning_rate", str(self.learning_rate), "--encoder_learning_rate", str(self.encoder_learning_rate),
                "--freeze_encoder_steps", str(self.freeze_encoder_steps)]


def _python(*argv: str) -> list[str]:
    return ["python", *argv]


def prepare(cfg: AdaptationConfig, dataset: Path, log_dir: Path) -> tuple[Path, Path | None, dict[str, float]]:
    """(shards of the adaptation corpus, BM25 negatives of the train queries or None, stage seconds)."""
    out = Path(cfg.output_dir)
    corpus = [Path(c).resolve() for c in cfg.corpus] or [dataset]
    files, fields = _corpus_inputs(corpus)
    shards = out / "shards" / dataset.name
    preprocess = Stage(f"{dataset.name}-preprocess", _python(
        "-m", "preprocessing.pretrain_data", "--input", *files, "--text_fields", *fields, "--output_dir", str(shards),
        "--max_seq_length", str(cfg.max_seq_length)), shards, inputs=tuple(map(Path, files)))
    seconds = {preprocess.name: run_stage(preprocess, log_dir)}
    negatives = None
    if (dataset / "qrels" / "train.tsv").is_file():
        negatives = out / "negatives" / dataset.name / "negatives.jsonl"
        seconds[f"{dataset.name}-mine-bm25"] = run_stage(Stage(
            f"{dataset.name}-mine-bm25", _python("-m", "finetune.mine_negatives", "--method", "bm25", "--data_dir",
                                                 str(dataset), "--out", str(negatives)), negatives.parent,
            inputs=(dataset,)), log_dir)
    return shards, negatives, seconds


def _corpus_inputs(sources: list[Path]) -> tuple[list[str], list[str]]:
    """(files, text fields) for the preprocessing job: BEIR folders give corpus.jsonl (title + text)."""
    files = [str(s / "corpus.jsonl") if s.is_dir() else str(s) for s in sources]
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--corpus {file}: no such file (a BEIR folder or a JSONL file)")
    with open(files[0], encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    return files, [name for name in ("title", "text") if name in first] or ["text"]


def with_sparse_half(tuned: str, dupmae: RepresentationConfig, pretrained: str, out: Path) -> str:
    """`out`: the fine-tuned encoder (tuned as `mean`; its folder keeps the pre-trained MLM head) with the pre-trained
    export's projection, saved as one `dupmae` folder (sparse/ and 2_Dense for sentence-transformers). This is what
    a fine-tuned dupmae row scores; the fine-tuning's own export records `mean` and has neither. Written again only
    when `tuned` changed (its stage fingerprint is recorded)."""
    from common.representation import PROJECTION_NAME, Encoder
    from common.tokenizer import load_tokenizer

    source = {"tuned": fingerprint(Path(tuned)), "pretrained": fingerprint(Path(resolve_model(pretrained))),
              "dupmae": asdict(dupmae)}
    record = out / "with_sparse_half.json"
    if record.is_file() and json.loads(record.read_text()) == source:
        return str(out)
    shutil.rmtree(out, ignore_errors=True)  # sparse/ links every file of the folder: none of an older export
    encoder = Encoder.from_pretrained(tuned, dupmae, projection_file=Path(resolve_model(pretrained)) / PROJECTION_NAME)
    encoder.save_pretrained(out, load_tokenizer(tuned))
    record.write_text(json.dumps(source) + "\n")
    return str(out)


class Experiment:
    """Runs every stage of one dataset and seed, reusing finished ones; returns the scores."""

    def __init__(self, cfg: AdaptationConfig, dataset: Path, seed: int, shards: Path, negatives: Path | None):
        self.cfg, self.dataset, self.seed, self.shards, self.negatives = cfg, dataset, seed, shards, negatives
        self.out = Path(cfg.output_dir) / dataset.name / f"seed-{seed}"
        self.seconds: dict[str, float] = {}
        self.models: dict[tuple[str, str], str] = {}  # (variant, stage) -> the model folder its rows score

    def run(self, variant: str) -> dict[str, dict[str, dict[str, float]]]:
        """{stage: {representation: metrics}} of one variant."""
        spec, out = VARIANTS[variant], self.out / variant
        model = self.cfg.model_name_or_path
        upstream: tuple[Path, ...] = ()
        if spec.pretrain_flags is not None:
            pretrained = self._pretrain(variant, spec, out / "pretrain")
            model, upstream = str(pretrained / "export"), (pretrained,)
        dupmae = dupmae_representation(model) if spec.dupmae else None  # one config for both stages
        scores = {"zero-shot": self._evaluate(f"{variant} zero-shot", model, dupmae, out / "zero-shot.json")}
        self.models[variant, "zero-shot"] = model
        if self.negatives is not None:
            tuned = str(self._finetune(variant, model, out / "finetune", upstream) / "model")
            if dupmae is not None:
                tuned = with_sparse_half(tuned, dupmae, model, out / "finetune" / "dupmae")
            scores["fine-tuned"] = self._evaluate(f"{variant} fine-tuned", tuned, dupmae, out / "fine-tuned.json")
            self.models[variant, "fine-tuned"] = tuned
        return scores

    def _pretrain(self, variant: str, spec: Variant, out: Path) -> Path:
        cfg = self.cfg
        command = [*_python("pretrain/main.py"), "--deepspeed", "ds_configs/zero2_cpu.json",
                   "--data_dir", str(self.shards), "--model_name_or_path", cfg.model_name_or_path,
                   "--output_dir", str(out), "--seed", str(self.seed), *cfg.pretrain_flags(), *spec.pretrain_flags,
                   *cfg.pretrain_extra, "--logging_steps", "10", "--save_steps", "0", "--save_total_limit", "1",
                   "--disable_tqdm"]
        self._stage(f"{self.dataset.name}-s{self.seed}-{variant}-pretrain", command, out, {"DS_ACCELERATOR": "cpu"},
                    (self.shards,))
        return out

    def _finetune(self, variant: str, model: str, out: Path, upstream: tuple[Path, ...]) -> Path:
        """The same fine-tuning for every variant: the base model's own embedding (mean, cosine for MiniLM)."""
        cfg = self.cfg
        command = _python("finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json", "--model_name_or_path",
                          model, "--representation", "mean", "--data_dir", str(self.dataset),
                          "--negatives", str(self.negatives), "--max_steps", str(cfg.finetune_steps),
                          "--per_device_train_batch_size", str(cfg.finetune_batch_size), "--train_group_size", "2",
                          "--learning_rate", str(cfg.finetune_learning_rate), "--passage_max_length",
                          str(cfg.max_length), "--logging_steps", "10", "--save_steps", str(cfg.finetune_steps),
                          "--seed", str(self.seed), "--output_dir", str(out))
        self._stage(f"{self.dataset.name}-s{self.seed}-{variant}-finetune", command, out, {"DS_ACCELERATOR": "cpu"},
                    (*upstream, self.dataset, self.negatives))
        return out

    def _stage(self, name: str, command: list[str], out: Path, env: dict[str, str], inputs: tuple[Path, ...]) -> None:
        self.seconds[name] = run_stage(Stage(name, command, out, env, inputs), self.out / "logs")

    def _evaluate(self, name: str, model: str, dupmae: RepresentationConfig | None,
                  result_file: Path) -> dict[str, dict[str, float]]:
        """{representation: metrics} on the test split, cached in result_file (keyed by the options and a
        fingerprint of the model folder, so a model trained again is evaluated again)."""
        key = {"model": model, "weights": fingerprint(Path(resolve_model(model))),
               "dupmae": asdict(dupmae) if dupmae else None, "max_length": self.cfg.max_length,
               "max_eval_docs": self.cfg.max_eval_docs, "dataset": str(self.dataset),
               "data": fingerprint(self.dataset)}
        if result_file.is_file() and (cached := json.loads(result_file.read_text()))["key"] == key:
            return cached["scores"]
        start = time.perf_counter()
        scores = evaluate_model(model, self.dataset, self.cfg.max_length, self.cfg.max_eval_docs, dupmae)
        self.seconds[f"{self.dataset.name}-s{self.seed}-{name}"] = time.perf_counter() - start
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
        logger.info("%s %s: %s", self.dataset.name, name,
                    {rep: round(values["nDCG@10"], 4) for rep, values in scores.items()})
        return scores
