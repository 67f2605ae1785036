"""The paper's ablation in miniature: MLM, RetroMAE and DupMAE pre-training of one small BERT from random init at one
budget (or of any masked-LM checkpoint, `init_model`, as the official code starts from bert-base-uncased), then the
same fine-tuning, scored zero-shot and fine-tuned on every test set.

Everything but the loss terms is shared within a seed: the initial weights (one saved random-init model per seed
that every variant starts from, or the `init_model` checkpoint for every seed), the data order and the masks (both
derived from the seed), the budget (steps, batch, length, learning rate, schedule), the fine-tuning (pairs, BM25
negatives, steps, seed, representation) and the scoring. Variants (`experiments.variants`): none (the starting
model as it is: the floor), mlm, retromae, dupmae (paper weights 1/1/1), dupmae-official (BoW x 0.1, masked tokens
pooled).

Stages, each reused when its command and inputs are unchanged (`experiments.stages`):
  corpus      general text (default: the first `general_mb` MB of the Gutenberg books in ../shared) plus every test
              set's corpus, as the paper's DupMAE† does; never a query
  tokenizer   a WordPiece vocabulary of `vocab_size` trained on that corpus: the vocabulary projections (MLM, decoder,
              BoW max-pool) dominate a small model's step, and 8k rows instead of bert-base's 30k cut the step
              about 3.7x (see `docs/ablation.md`). tokenizers' trainer breaks frequency ties in hash order, so
              another training on the same corpus can differ in a few rare pieces: the stage trains it once per
              output folder and every later stage reads that folder. With `init_model`: none, every stage reads
              the checkpoint's own tokenizer
  shards      the Beam preprocessing job with that tokenizer
  pairs       one fine-tuning set: the training queries of every test set that has qrels/train.tsv, ids prefixed by
              the set's name, with BM25 negatives mined once
  per seed    the random-init model (none with `init_model`: the checkpoint's folder); per variant: pre-training
              (DeepSpeed, fp32, with the retrieval probe on the train queries of the first fine-tuning set: a dev
              sample, never the test queries), fine-tuning
              ([CLS], cosine, BM25 negatives), and evaluation of both stages with cls, mean and, for the variants
              with a BoW head, dupmae (the same config at both stages: the [CLS] half plus the BoW head's sparse half)
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.representation import RepresentationConfig
from experiments.scoring import bm25_scores, dupmae_representation, evaluate_model, fused_scores
from experiments.stages import Stage, fingerprint, run_stage
from experiments.variants import VARIANTS

logger = logging.getLogger(__name__)

REFERENCE_MODEL = "default"  # the packaged all-MiniLM-L6-v2: a trained model beside the miniature ones
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass
class AblationConfig:
    """The experiment's options; pre-training and fine-tuning ones are those stages' flags of the same meaning."""

    output_dir: str
    datasets: list[str] = field(default_factory=list)  # BEIR test sets; empty: ../shared SciFact + the docstring set
    general_corpus: str = ""  # JSONL with a "text" field; empty: ../shared's Gutenberg books when present
    general_mb: float = 6.0  # MB of general text taken from it
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: int = 2
    first_seed: int = 42  # seeds first_seed .. first_seed + seeds - 1 (two processes can split the seeds)
    # the starting model: a HF masked-LM checkpoint (hub name or folder; a hub name is read from the local HF cache,
    # as every stage runs offline) with its own tokenizer and config; empty: random init of the shape below with a
    # WordPiece vocabulary trained on the corpus. With a checkpoint, the shape and --vocab_size are not used
    init_model: str = ""
    # the random-init model and its vocabulary: sized for 8+ pre-training runs in <= 120 min on 2 cores. The first
    # defaults (4 layers, 256 wide, vocabulary 8192, 300 steps at lr 5e-4, 100 fine-tuning steps) took 12-30 min
    # per pre-training run and left every retriever near chance (docs/results.md#ablation)
    vocab_size: int = 4096
    num_hidden_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 2
    intermediate_size: int = 512
    # pre-training: the same budget for every variant
    max_steps: int = 700
    per_device_train_batch_size: int = 32
    max_seq_length: int = 128
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.1
    probe_steps: int = 350  # the retrieval probe's period (0: no probe)
    # fine-tuning: the same for every variant
    finetune_steps: int = 300
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 3e-4  # 1e-4 left the random init's training loss at ln(64), chance
    # evaluation
    max_length: int = 128  # document tokens (queries: 64)
    max_eval_docs: int = 0  # 0: the whole corpus

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        positive = ("seeds", "vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
                    "intermediate_size", "max_steps", "per_device_train_batch_size", "finetune_steps",
                    "finetune_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"--hidden_size {self.hidden_size} is not a multiple of --num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.general_mb < 0 or self.probe_steps < 0:
            raise ValueError("--general_mb and --probe_steps must be >= 0")


def _python(*argv: str) -> list[str]:
    return ["python", *argv]


def _write_if_changed(path: Path, key: dict, write) -> None:
    """Run write(path) unless path's key file records the same key (in-process stages: corpus, tokenizer)."""
    key_file = path.with_name(path.name + ".key.json")
    if path.exists() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return
    write(path)
    key_file.write_text(json.dumps(key, indent=2) + "\n")


def _beir_texts(folder: Path):
    with open(folder / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                yield f"{record.get('title') or ''} {record.get('text') or ''}".strip()


def build_corpus(general: Path | None, general_mb: float, datasets: list[Path], out: Path) -> None:
    """One JSONL {"id", "text"}: the general text up to `general_mb` MB (whole records, the last one cut), then
    every dataset's corpus (title + text). No query is ever written."""
    budget = int(general_mb * 1_000_000)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as sink:
        if general is not None and budget > 0:
            with open(general, encoding="utf-8") as handle:
                for number, line in enumerate(handle):
                    text = json.loads(line)["text"][:budget]
                    sink.write(json.dumps({"id": f"general-{number}", "text": text}) + "\n")
                    budget -= len(text)
                    if budget <= 0:
                        break
        for dataset in datasets:
            for number, text in enumerate(_beir_texts(dataset)):
                if text:
                    sink.write(json.dumps({"id": f"{dataset.name}-{number}", "text": text}) + "\n")


def train_tokenizer(corpus: Path, vocab_size: int, out: Path) -> None:
    """A lower-cased BERT WordPiece vocabulary trained on the corpus ([CLS] x [SEP] around every text), saved as a
    fast tokenizer folder that every stage loads like a hub tokenizer."""
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts(), vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend = wordpiece._tokenizer
    backend.post_processor = BertProcessing(("[SEP]", backend.token_to_id("[SEP]")),
                                            ("[CLS]", backend.token_to_id("[CLS]")))
    pad, unk, cls, sep, mask = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token=unk, cls_token=cls,
                                        sep_token=sep, mask_token=mask, model_max_length=512)
    tokenizer.save_pretrained(str(out))


def build_pairs(datasets: list[Path], out: Path) -> None:
    """One BEIR folder of every dataset's training queries and corpus, ids prefixed by the dataset's name."""
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as corpus, \
            open(out / "queries.jsonl", "w", encoding="utf-8") as queries, \
            open(out / "qrels" / "train.tsv", "w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for dataset in datasets:
            prefix = f"{dataset.name}/"
            for name, sink in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
                with open(dataset / name, encoding="utf-8") as handle:
                    for line in handle:
                        if line.strip():
                            record = json.loads(line)
                            sink.write(json.dumps({**record, "_id": prefix + str(record["_id"])}) + "\n")
            with open(dataset / "qrels" / "train.tsv", encoding="utf-8") as handle:
                for number, line in enumerate(handle):
                    parts = line.rstrip("\n").split("\t")
                    if number == 0 and not parts[-1].lstrip("-").isdigit():
                        continue  # the header
                    qrels.write(f"{prefix}{parts[0]}\t{prefix}{parts[1]}\t{parts[2]}\n")


def resolve_init_model(name_or_path: str) -> Path:
    """The folder of `init_model`: a folder as given (absolute), else a hub name's snapshot in the local Hugging Face
    cache. Stage commands carry this folder and stage inputs fingerprint its files, so another checkpoint, or new
    weights under the same name, runs every stage that reads it again."""
    from common.defaults import resolve_model

    path = Path(resolve_model(name_or_path)).expanduser()
    if path.is_dir():
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or not a valid repo id (HFValidationError)
        raise ValueError(f"--init_model {name_or_path!r}: not a folder, and not in the Hugging Face cache "
                         f"({type(exc).__name__}); the stages run offline, so download it first "
                         f"(`hf download {name_or_path}`) or pass a folder") from None


def save_initial_model(cfg: AblationConfig, tokenizer_dir: Path, seed: int, out: Path) -> None:
    """The random-init BERT (with its MLM head) that every variant of this seed starts from. Its
    representation.json says [CLS] + cosine, so the dupmae representation derived from it at both stages is the
    [CLS] half (identity projection) plus the BoW head's sparse half (`common.representation.dupmae_config`)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from common.representation import CONFIG_NAME
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / CONFIG_NAME).write_text(json.dumps(asdict(RepresentationConfig(kind="cls", normalize=True)), indent=2))


class Ablation:
    """Runs (or reuses) every stage; `run()` returns {dataset: [per seed {variant: {stage: {rep: metrics}}}]}."""

    def __init__(self, cfg: AblationConfig, datasets: list[Path], general: Path | None):
        self.cfg, self.datasets, self.general = cfg, datasets, general
        self.init = resolve_init_model(cfg.init_model) if cfg.init_model else None  # None: random init per seed
        self.out = Path(cfg.output_dir)
        self.logs = self.out / "logs"
        self.seconds: dict[str, float] = {}
        self.train_sets = [d for d in datasets if (d / "qrels" / "train.tsv").is_file()]

    def _stage(self, name: str, command: list[str], output: Path, inputs: tuple[Path, ...]) -> Path:
        self.seconds[name] = run_stage(Stage(name, command, output, {"DS_ACCELERATOR": "cpu"}, inputs), self.logs)
        return output

    def _timed(self, name: str, work) -> None:
        start = time.perf_counter()
        work()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def prepare(self) -> None:
        """Corpus, tokenizer, shards, fine-tuning pairs and their BM25 negatives (shared by every seed)."""
        cfg, data = self.cfg, self.out / "data"
        self.corpus = data / "pretrain_corpus.jsonl"
        corpus_key = {"general": str(self.general), "general_mb": cfg.general_mb,
                      "general_data": fingerprint(self.general) if self.general else None,
                      "datasets": {str(d): fingerprint(d / "corpus.jsonl") for d in self.datasets}}
        self._timed("corpus", lambda: _write_if_changed(
            self.corpus, corpus_key, lambda path: build_corpus(self.general, cfg.general_mb, self.datasets, path)))
        if self.init is not None:
            self.tokenizer = self.init  # the checkpoint's own vocabulary: its embeddings' rows
        else:
            self.tokenizer = self.out / "tokenizer"
            tokenizer_key = {"corpus": fingerprint(self.corpus), "vocab_size": cfg.vocab_size}
            self._timed("tokenizer", lambda: _write_if_changed(
                self.tokenizer, tokenizer_key, lambda path: train_tokenizer(self.corpus, cfg.vocab_size, path)))
        self.shards = self._stage("preprocess", _python(
            "-m", "preprocessing.pretrain_data", "--input", str(self.corpus), "--text_fields", "text",
            "--tokenizer", str(self.tokenizer), "--output_dir", str(self.out / "shards"), "--max_seq_length",
            str(cfg.max_seq_length)), self.out / "shards", (self.corpus, self.tokenizer))
        self.pairs = self.negatives = None
        if self.train_sets:
            self.pairs = data / "finetune_pairs"
            pairs_key = {str(d): fingerprint(d) for d in self.train_sets}
            self._timed("pairs", lambda: _write_if_changed(self.pairs, pairs_key,
                                                           lambda path: build_pairs(self.train_sets, path)))
            self.negatives = self._stage("mine-bm25", _python(
                "-m", "finetune.mine_negatives", "--method", "bm25", "--data_dir", str(self.pairs), "--out",
                str(self.out / "negatives" / "negatives.jsonl")), self.out / "negatives", (self.pairs,)) \
                / "negatives.jsonl"

    def references(self) -> dict[str, dict[tuple[str, str], dict[str, float]]]:
        """{dataset: {(row, representation): metrics}}: BM25, the packaged MiniLM zero-shot (its own mean + cosine)
        and the MiniLM fused with BM25 by reciprocal rank (k = 60). Cached by the data's fingerprint."""
        cfg, rows = self.cfg, {}
        for dataset in self.datasets:
            cache = self.out / "references" / f"{dataset.name}.json"
            key = {"data": fingerprint(dataset), "max_length": cfg.max_length, "max_eval_docs": cfg.max_eval_docs}
            if cache.is_file() and (cached := json.loads(cache.read_text()))["key"] == key:
                rows[dataset.name] = {tuple(k.split("|")): v for k, v in cached["rows"].items()}
                continue
            start = time.perf_counter()
            minilm = evaluate_model(REFERENCE_MODEL, dataset, cfg.max_length, cfg.max_eval_docs)
            rows[dataset.name] = {
                ("bm25", "bm25"): bm25_scores(dataset, cfg.max_eval_docs),
                ("all-MiniLM-L6-v2", "mean"): minilm["mean"],
                ("all-MiniLM-L6-v2+bm25", "rrf"): fused_scores(REFERENCE_MODEL, dataset, cfg.max_length,
                                                               cfg.max_eval_docs)}
            self.seconds[f"references-{dataset.name}"] = time.perf_counter() - start
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "rows": {"|".join(k): v for k, v in rows[dataset.name].items()}},
                                        indent=2) + "\n")
        return rows

    def run(self) -> dict[str, list[dict]]:
        self.prepare()
        results: dict[str, list[dict]] = {d.name: [] for d in self.datasets}
        for seed in range(self.cfg.first_seed, self.cfg.first_seed + self.cfg.seeds):
            per_variant = {variant: self.run_variant(variant, seed) for variant in self.cfg.variants}
            for dataset in self.datasets:
                results[dataset.name].append({v: scores[dataset.name] for v, scores in per_variant.items()})
        return results

    def initial_model(self, seed: int) -> Path:
        """The model every variant of this seed starts from: the `init_model` checkpoint, or this seed's saved random
        init (`SEED/init`)."""
        if self.init is not None:
            return self.init
        init = self.out / f"seed-{seed}" / "init"
        key = {"tokenizer": fingerprint(self.tokenizer), "seed": seed,
               "shape": [self.cfg.num_hidden_layers, self.cfg.hidden_size, self.cfg.num_attention_heads,
                         self.cfg.intermediate_size]}
        self._timed(f"s{seed}-init", lambda: _write_if_changed(
            init, key, lambda path: save_initial_model(self.cfg, self.tokenizer, seed, path)))
        return init

    def run_variant(self, variant: str, seed: int) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
        """{dataset: {stage: {representation: metrics}}} of one variant and seed."""
        spec, out = VARIANTS[variant], self.out / f"seed-{seed}" / variant
        model = self.initial_model(seed)
        if spec.pretrain_flags is not None:
            model = self._pretrain(variant, spec.pretrain_flags, seed, model, out / "pretrain") / "export"
        dupmae = dupmae_representation(str(model)) if spec.dupmae else None  # one config for both stages
        models = {"zero-shot": model}
        if self.pairs is not None:
            models["fine-tuned"] = self._finetune(variant, seed, model, out / "finetune") / "model"
        scores: dict = {d.name: {} for d in self.datasets}
        for stage, folder in models.items():
            for dataset in self.datasets:
                scores[dataset.name][stage] = self._evaluate(f"s{seed}-{variant}-{stage}", folder, dupmae, dataset,
                                                             out / f"{stage}-{dataset.name}.json")
        return scores

    def pretrain_command(self, flags: tuple[str, ...], seed: int, init: Path, out: Path) -> list[str]:
        cfg = self.cfg
        command = _python("pretrain/main.py", "--deepspeed", "ds_configs/zero2_cpu.json", "--bf16", "false",
                          "--data_dir", str(self.shards), "--model_name_or_path", str(init),
                          "--output_dir", str(out), "--seed", str(seed), "--max_steps", str(cfg.max_steps),
                          "--per_device_train_batch_size", str(cfg.per_device_train_batch_size),
                          "--max_seq_length", str(cfg.max_seq_length), "--learning_rate", str(cfg.learning_rate),
                          "--warmup_ratio", str(cfg.warmup_ratio), *flags, "--logging_steps", "10",
                          "--save_steps", "0", "--save_total_limit", "1", "--disable_tqdm")
        if cfg.probe_steps and self.train_sets:  # a dev sample: training queries, never the test ones
            command += ["--eval_dataset", str(self.train_sets[0]), "--eval_split", "train", "--eval_steps",
                        str(cfg.probe_steps), "--eval_max_queries", "200", "--eval_max_docs", "1000"]
        return command

    def _pretrain(self, variant: str, flags: tuple[str, ...], seed: int, init: Path, out: Path) -> Path:
        return self._stage(f"s{seed}-{variant}-pretrain", self.pretrain_command(flags, seed, init, out), out,
                           (self.shards, init))

    def _finetune(self, variant: str, seed: int, model: Path, out: Path) -> Path:
        """The same fine-tuning for every variant: [CLS] + cosine (temperature 0.05), one BM25 negative each; fp32
        like pre-training, so the experiment computes the same on every machine."""
        cfg = self.cfg
        command = _python("finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json", "--bf16", "false",
                          "--model_name_or_path", str(model), "--representation", "cls", "--normalize", "true",
                          "--data_dir", str(self.pairs),
                          "--negatives", str(self.negatives), "--max_steps", str(cfg.finetune_steps),
                          "--per_device_train_batch_size", str(cfg.finetune_batch_size), "--train_group_size", "2",
                          "--learning_rate", str(cfg.finetune_learning_rate), "--passage_max_length",
                          str(cfg.max_length), "--logging_steps", "10", "--save_steps", str(cfg.finetune_steps),
                          "--seed", str(seed), "--output_dir", str(out))
        return self._stage(f"s{seed}-{variant}-finetune", command, out, (model, self.pairs, self.negatives))

    def _evaluate(self, name: str, model: Path, dupmae: RepresentationConfig | None, dataset: Path,
                  result_file: Path) -> dict[str, dict[str, float]]:
        """{representation: metrics} on the test split, cached by the options and the model's weights."""
        key = {"weights": fingerprint(model), "dupmae": asdict(dupmae) if dupmae else None,
               "max_length": self.cfg.max_length, "max_eval_docs": self.cfg.max_eval_docs,
               "data": fingerprint(dataset)}
        if result_file.is_file() and (cached := json.loads(result_file.read_text()))["key"] == key:
            return cached["scores"]
        start = time.perf_counter()
        scores = evaluate_model(str(model), dataset, self.cfg.max_length, self.cfg.max_eval_docs, dupmae)
        self.seconds[f"{name}-eval-{dataset.name}"] = time.perf_counter() - start
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
        logger.info("%s %s: %s", dataset.name, name, {rep: round(v["nDCG@10"], 4) for rep, v in scores.items()})
        return scores
