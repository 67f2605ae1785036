"""Fine-tuning parity with the official code: the same losses and gradients as RetroMAE's BiEncoderModel from the
same weights and batches, step for step.

    python benchmarks/official_finetune_parity.py --official_src RetroMAE/src --official_python VENV/bin/python
    python benchmarks/official_finetune_parity.py --smoke --official_src ... --official_python ...   # 2 minutes

RetroMAE/src: the upstream `src/` folder of github.com/staoxiao/RetroMAE, unchanged (`bi_encoder/` in it); VENV: a
Python with torch, transformers 4.46.3 and `datasets` (the official `data.py` imports it), the one
`official_parity.py` uses (docs/pretraining.md#parity-with-the-official-code says how to make it).

For each init (`minilm`: the packaged all-MiniLM-L6-v2's BertModel; `random`: a small random BertModel), with every
dropout probability 0 (two RNG streams cannot match), fp32, and for each case:
- `in-batch` (a group of 1: the positive; the other queries' positives are the negatives), `hard-negatives` (1
  positive + 3 mined negatives, `cls` and `mean` pooling), `cross-device` (2 gloo ranks on loopback on both sides,
  each its own batch, per-rank gradients compared) and `teacher` (a score file in the official format, read by
  each side's own reader; the official KL: `nn.KLDivLoss(reduction="mean")` + 0.5 x InfoNCE);
- the batches are our data pipeline's: `finetune.data.GroupSampler` + `Collator` on a small BEIR folder with
  mined negatives, exactly what `finetune/main.py` draws at each step; the official model gets the same tensors;
- step 1: the loss and every parameter's gradient of one forward/backward: ours by `finetune.model.BiEncoder`,
  theirs by `bi_encoder.modeling.BiEncoderModel` (`negatives_x_device` on 2 ranks);
- --steps optimizer steps: ours a real `finetune/main.py` run (its DeepSpeed engine, ds_configs/finetune_cpu.json,
  one process or 2 ranks by torch.distributed.run; the losses of metrics.jsonl), theirs under what HF Trainer
  (4.46.3) builds for BiEncoderModel: `torch.optim.AdamW` over `Trainer.get_decay_parameter_names`,
  `get_linear_schedule_with_warmup`, `clip_grad_norm_` 1.0, and on 2 ranks DistributedDataParallel with
  find_unused_parameters (Trainer's choice for a model that is not a PreTrainedModel). The loop is written out
  as Trainer runs it: the official BiTrainer's `compute_loss` lacks the `num_items_in_batch` argument that
  Trainer 4.46.3 passes, so `BiTrainer.train()` itself stops at the first step with a TypeError.
Ours runs with the options that reach the official computation (`OFFICIAL_OPTIONS`: `--kl_reduction mean`,
`--official_cross_device`) and, where they differ, at our defaults too: those lines ("options": "default")
measure the size of the documented departures, not a fault.

One JSON line per figure: {"bench": "official_finetune_parity", "official_model": "BiEncoderModel", "case",
"pooling", "init", "options", "metric" (step1_loss_rel_diff, step1_grad_max_rel_l2, steps_loss_max_rel_diff),
"ours", "target", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.official_parity import (LEARNING_RATE, MAX_GRAD_NORM, TARGETS, WARMUP_RATIO, WEIGHT_DECAY,  # noqa: E402
                                        grad_max_rel_l2, hf_trainer_optimizer, init_bert, line, official_parser,
                                        rel, run_official)

#: case -> (train_group_size, ranks, teacher scores): the issue's four cases.
CASES = {"in-batch": (1, 1, False), "hard-negatives": (4, 1, False), "cross-device": (4, 2, False),
         "teacher": (4, 1, True)}
#: Our options that compute what BiEncoderModel computes, where our default departs on purpose.
OFFICIAL_OPTIONS = {"cross-device": {"official_cross_device": True}, "teacher": {"kl_reduction": "mean"}}
#: InfoNCE temperature by init, on dot products of [CLS] (not normalized) as the official recipe scores
#: (examples/retriever/msmarco); official_parity.py's optimizer settings (lr 1e-4: the recipe's 2e-5 moves the
#: weights less, a weaker test). The random BERT takes the recipe's 1; the packaged MiniLM's [CLS] products run to
#: hundreds, so at 1 its in-batch loss is 0 in fp32 from the first step (nothing to compare), and at 20 it is 0.8.
TEMPERATURE = {"minilm": 20.0, "random": 1.0}
CONTRASTIVE_LOSS_WEIGHT = 0.5  # teacher case: loss = KL + 0.5 x InfoNCE on both sides (both terms matter)
SEED = 42


def official_name(ours: str) -> str:
    """A parameter of our tied BiEncoder -> BiEncoderModel's name for it (its lm_p is lm_q)."""
    prefix = "query_encoder.model."
    if not ours.startswith(prefix):
        raise KeyError(f"{ours}: no counterpart in BiEncoderModel")
    return "lm_q." + ours[len(prefix):]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")


def spawn(worker, world: int, *args) -> None:
    """worker(rank, port, *args) in `world` processes joined by gloo on loopback (one process: no group)."""
    import torch.multiprocessing as mp

    port = free_port()
    if world == 1:
        worker(0, None, *args)
    else:
        mp.spawn(worker, args=(port, *args), nprocs=world, join=True)


# ---------------------------------------------------------------- the official side (run by --official_python)

def official_worker(rank: int, port: int | None, job: dict, result: str) -> None:
    """Step 1 (loss, gradients) and the --steps losses of BiEncoderModel on this rank's batches."""
    import torch
    import torch.distributed as dist
    from types import SimpleNamespace

    torch.set_num_threads(job["threads"])
    world = job["world"]
    if world > 1:
        join_gloo(rank, world, port)
    sys.path.insert(0, job["official_src"])
    from bi_encoder.arguments import ModelArguments
    from bi_encoder.data import read_teacher_score
    from bi_encoder.modeling import BiEncoderModel

    table = read_teacher_score(job["teacher_file"]) if job["teacher_file"] else None

    def inputs(batch: dict) -> dict:
        out = {"query": batch["query"], "passage": batch["passage"]}
        if table is not None:  # TrainDatasetForBiE.__getitem__'s lookup, BiCollator's FloatTensor
            out["teacher_score"] = torch.FloatTensor([[table[qid][pid] for pid in pids] for qid, pids in batch["ids"]])
        return out

    def build():
        model_args = ModelArguments(model_name_or_path=job["init_dir"], sentence_pooling_method=job["pooling"])
        train_args = SimpleNamespace(negatives_x_device=world > 1, temperature=job["temperature"],
                                     contrastive_loss_weight=job["contrastive_loss_weight"])
        return BiEncoderModel.build(model_args, train_args).train()

    batches = job["batches"][rank]
    step1 = {}
    for dtype in (torch.float32, torch.float64):  # fp64: the rounding control
        model = build().to(dtype)
        batch = inputs(batches[0])
        if "teacher_score" in batch:
            batch["teacher_score"] = batch["teacher_score"].to(dtype)
        loss = model(**batch).loss
        loss.backward()
        step1[str(dtype)] = {"loss": float(loss.detach()), "grads": {
            name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}}

    model = build()
    optimizer, scheduler, _ = hf_trainer_optimizer(model, len(batches), LEARNING_RATE)
    wrapped = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    losses = []
    for batch in batches:  # Trainer.training_step, then the clip / step / schedule / zero_grad of its loop
        step_loss = wrapped(**inputs(batch)).loss
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        model.zero_grad()
        logged = step_loss.detach().clone()
        if world > 1:  # Trainer logs the mean over ranks
            dist.all_reduce(logged)
            logged /= world
        losses.append(float(logged))
    torch.save({**step1["torch.float32"], "fp64": step1["torch.float64"], "losses": losses}, f"{result}.rank{rank}")
    if world > 1:
        dist.destroy_process_group()


def official_side(args: argparse.Namespace) -> None:
    import torch

    job = torch.load(args.job, weights_only=False)
    spawn(official_worker, job["world"], job, args.result)
    torch.save([torch.load(f"{args.result}.rank{r}", weights_only=False) for r in range(job["world"])], args.result)


# ---------------------------------------------------------------- our side

def make_init(kind: str, folder: Path, tokenizer) -> Path:
    """A BertModel with dropout 0 and the tokenizer, saved as a plain HF folder (both sides load it)."""
    model = init_bert(kind, tokenizer, "AutoModel")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_data(folder: Path) -> tuple[Path, Path, Path]:
    """(BEIR folder, mined negatives JSONL, teacher score file): smoke.py's 8 topics, each query's 15 other
    documents as its ranked negatives (its near miss first), and a seeded score for every (query, document)."""
    import random

    from benchmarks.smoke import tiny_beir
    from finetune.teacher import write_teacher_scores

    beir = tiny_beir(folder / "beir")
    docs = [json.loads(row)["_id"] for row in (beir / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(row)["_id"] for row in (beir / "queries.jsonl").read_text().splitlines()]
    negatives = folder / "negatives.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": q, "negatives": [f"n{i}"] + [d for d in docs if d not in
                                                                                      (f"d{i}", f"n{i}")]}) + "\n"
                                 for i, q in enumerate(queries)))
    rng = random.Random(0)
    teacher = folder / "teacher.txt"
    write_teacher_scores(teacher, {q: {d: round(rng.gauss(0, 2), 4) for d in docs} for q in queries})
    return beir, negatives, teacher


def finetune_flags(init_dir: Path, data: tuple[Path, Path, Path], case: str, pooling: str, temperature: float,
                   options: dict, args: argparse.Namespace, output_dir: Path) -> dict:
    """The finetune/main.py flags of one run (FinetuneConfig fields)."""
    group, world, with_teacher = CASES[case]
    beir, negatives, teacher = data
    flags = {"model_name_or_path": str(init_dir), "representation": pooling, "normalize": False,
             "temperature": temperature, "data_dir": str(beir), "negatives": str(negatives),
             "train_group_size": group, "per_device_train_batch_size": args.batch_size,
             "query_max_length": args.query_max_length, "passage_max_length": args.passage_max_length,
             "cross_device_negatives": world > 1, "deepspeed": str(ROOT / "ds_configs" / "finetune_cpu.json"),
             "bf16": "false", "output_dir": str(output_dir), "learning_rate": LEARNING_RATE,
             "warmup_ratio": WARMUP_RATIO, "weight_decay": WEIGHT_DECAY, "max_steps": args.steps, "logging_steps": 1,
             "save_steps": 10 ** 9, "seed": SEED, **options}
    if with_teacher:
        flags.update(teacher_scores=str(teacher), contrastive_loss_weight=CONTRASTIVE_LOSS_WEIGHT)
    return flags


def our_batches(flags: dict, rank: int, world: int, steps: int) -> list[dict]:
    """What finetune/main.py's Trainer draws on `rank` at steps 1..steps: the collated tensors and the ids."""
    from common.tokenizer import load_tokenizer
    from finetune.data import Collator, DeadLetter, GroupSampler, load_finetune_data

    tokenizer = load_tokenizer(flags["model_name_or_path"])
    data = load_finetune_data(flags["data_dir"], "train", flags["negatives"], tokenizer, DeadLetter(None))
    sampler = GroupSampler(data.groups, list(data.corpus), flags["train_group_size"],
                           flags["per_device_train_batch_size"], rank, world, flags["seed"])
    collator = Collator(tokenizer, flags["query_max_length"], flags["passage_max_length"])
    batches = []
    for step in range(steps):
        ids = sampler.batch(*divmod(step, sampler.steps_per_epoch))
        query, passage = collator([data.queries[q] for q, _ in ids], [data.corpus[p] for _, group in ids
                                                                       for p in group])
        batches.append({"query": query, "passage": passage, "ids": ids})
    return batches


def ours_step1_worker(rank: int, port: int | None, flags: dict, world: int, result: str) -> None:
    """Our BiEncoder's step-1 loss and gradients on this rank's first batch (per-rank: before any averaging)."""
    import torch

    from finetune.config import FinetuneConfig
    from finetune.model import BiEncoder
    from finetune.teacher import group_scores, read_teacher_scores

    torch.set_num_threads(flags.pop("threads"))
    if world > 1:
        join_gloo(rank, world, port)
    cfg = FinetuneConfig(**flags)
    batch = our_batches(flags, rank, world, 1)[0]
    teacher = group_scores(read_teacher_scores(cfg.teacher_scores), batch["ids"]) if cfg.teacher_scores else None
    step1 = {}
    for dtype in (torch.float32, torch.float64):  # fp64: the rounding control
        torch.manual_seed(cfg.seed)
        model = BiEncoder.from_config(cfg).train().to(dtype)
        output = model(batch["query"], batch["passage"], None if teacher is None else teacher.to(dtype))
        output.loss.backward()
        step1[str(dtype)] = {"loss": float(output.loss.detach()), "grads": {
            official_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
    torch.save({**step1["torch.float32"], "fp64": step1["torch.float64"]}, f"{result}.rank{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


def ours_step1(flags: dict, world: int, threads: int, result: Path) -> list[dict]:
    import torch

    spawn(ours_step1_worker, world, {**flags, "threads": threads}, world, str(result))
    return [torch.load(f"{result}.rank{r}", weights_only=False) for r in range(world)]


def ours_steps(flags: dict, world: int, threads: int) -> list[float]:
    """The per-step losses (mean over ranks) of a real finetune/main.py run, from its metrics.jsonl."""
    command = [sys.executable, str(ROOT / "finetune" / "main.py")]
    if world > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "finetune" / "main.py")]
    for key, value in flags.items():
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"finetune/main.py failed:\n{done.stderr[-3000:]}")
    metrics = [json.loads(row) for row in (Path(flags["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in metrics]


def worst_over_ranks(ours: list[dict], theirs: list[dict]) -> tuple[float, str, dict, int, list[float]]:
    """`grad_max_rel_l2` of each rank's gradients: (worst value, its tensor, noise tensors, its rank, per rank)."""
    per_rank = [grad_max_rel_l2(o, t) for o, t in zip(ours, theirs)]
    rank = max(range(len(per_rank)), key=lambda r: per_rank[r][0])
    return (*per_rank[rank], rank, [p[0] for p in per_rank])


def compare(ours1: list[dict], theirs: list[dict], steps: list[float]) -> dict:
    """The three figures: rank-mean step-1 loss, the worst rank's gradient, the worst step's loss; beside the
    gradient, the fp64 control: both sides in fp64, and each side's fp32 gradient against its own fp64 one (the
    size of fp32 rounding in this batch)."""
    loss_ours = sum(r["loss"] for r in ours1) / len(ours1)
    loss_theirs = sum(r["loss"] for r in theirs) / len(theirs)
    worst_grad, worst_name, noise, rank, per_rank = worst_over_ranks([o["grads"] for o in ours1],
                                                                     [t["grads"] for t in theirs])
    fp64 = worst_over_ranks([o["fp64"]["grads"] for o in ours1], [t["fp64"]["grads"] for t in theirs])
    rounding = {f"{side}_fp32_vs_own_fp64": worst_over_ranks(
        [{n: g.double() for n, g in r["grads"].items()} for r in results], [r["fp64"]["grads"] for r in results])[0]
        for side, results in (("ours", ours1), ("official", theirs))}
    official_steps = theirs[0]["losses"]
    if len(steps) != len(official_steps):
        raise SystemExit(f"ours logged {len(steps)} steps, the official side ran {len(official_steps)}")
    step_diffs = [rel(a, b) for a, b in zip(steps, official_steps)]
    worst_step = max(range(len(step_diffs)), key=step_diffs.__getitem__)
    return {
        "step1_loss_rel_diff": (rel(loss_ours, loss_theirs), {"loss_ours": loss_ours, "loss_official": loss_theirs}),
        "step1_grad_max_rel_l2": (worst_grad, {"worst_parameter": worst_name, "worst_rank": rank,
                                               "per_rank": per_rank, "parameters": len(ours1[0]["grads"]),
                                               "zero_in_exact_arithmetic": noise, "fp64_control": fp64[0],
                                               "fp64_worst_parameter": fp64[1], **rounding}),
        "steps_loss_max_rel_diff": (max(step_diffs), {"steps": len(steps), "worst_step": worst_step + 1,
                                                      "losses_ours": steps, "losses_official": official_steps}),
    }


def parity(args: argparse.Namespace, init: str, case: str, pooling: str, init_dir: Path, data, work: Path) -> None:
    group, world, with_teacher = CASES[case]
    threads = max(1, args.threads // world)
    folder = work / f"{init}-{case}-{pooling}"
    folder.mkdir(parents=True, exist_ok=True)
    variants = {"official": OFFICIAL_OPTIONS.get(case, {})}
    if variants["official"] and "default" in args.variants.split(","):
        variants["default"] = {}
    flags = {name: finetune_flags(init_dir, data, case, pooling, TEMPERATURE[init], options, args,
                                  folder / f"run-{name}")
             for name, options in variants.items()}
    any_flags = flags["official"]
    job = {"official_src": str(Path(args.official_src).resolve()), "init_dir": str(init_dir), "pooling": pooling,
           "temperature": TEMPERATURE[init],
           "world": world, "threads": threads, "teacher_file": any_flags.get("teacher_scores"),
           "contrastive_loss_weight": any_flags.get("contrastive_loss_weight", 1.0),
           "batches": [our_batches(any_flags, rank, world, args.steps) for rank in range(world)]}
    theirs = run_official(args, "official", job, folder, __file__)  # one result per rank
    common = {"bench": "official_finetune_parity", "official_model": "BiEncoderModel", "case": case,
              "pooling": pooling, "init": init, "temperature": TEMPERATURE[init], "unit": "relative", "better": "lower",
              "ranks": world,
              "train_group_size": group, "queries_per_rank": args.batch_size, "precision": "fp32",
              "threads": args.threads, "smoke": args.smoke}
    for name, options in variants.items():
        figures = compare(ours_step1(flags[name], world, threads, folder / f"ours-step1-{name}.pt"), theirs,
                          ours_steps(flags[name], world, threads))
        for metric, (value, extra) in figures.items():
            target = TARGETS[metric]
            line(**common, options=name, our_options=options, metric=metric, ours=value, target=target,
                 baseline=target, ratio=value / target, within_target=value <= target, **extra)


def main() -> None:
    from benchmarks import smoke

    parser = official_parser(__doc__, "the official RetroMAE `src` folder, with bi_encoder/ (default: $RETROMAE_SRC)")
    parser.add_argument("--cases", default="in-batch,hard-negatives,hard-negatives:mean,cross-device,teacher",
                        help="comma-separated CASE or CASE:POOLING (cls unless said)")
    parser.add_argument("--batch_size", type=int, default=4, help="queries per rank")
    parser.add_argument("--query_max_length", type=int, default=32)
    parser.add_argument("--passage_max_length", type=int, default=64)
    parser.add_argument("--variants", default="official,default",
                        help="'default' adds our defaults where they depart from the official options")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps compared (step 1 included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per side (split over its ranks)")
    parser.add_argument("--output_dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--side", choices=["ours", "official"], default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = smoke.parse_args(parser, inits="random", cases="cross-device,teacher", variants="official", steps=2,
                            passage_max_length=32)
    if args.side == "official":
        official_side(args)
        return
    if not args.official_src:
        raise SystemExit("--official_src (or RETROMAE_SRC) is required: the official code is the reference")
    if not (Path(args.official_src) / "bi_encoder" / "modeling.py").is_file():
        raise SystemExit(f"--official_src {args.official_src}: no bi_encoder/modeling.py there")
    import torch

    from common.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(None)
    cases = [(c.split(":") + ["cls"])[:2] for c in args.cases.split(",")]
    for case, pooling in cases:
        if case not in CASES or pooling not in ("cls", "mean"):
            raise SystemExit(f"--cases: {case}:{pooling} is not one of {sorted(CASES)} x cls/mean")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.output_dir or tmp)
        data = make_data(work / "data")
        for init in args.inits.split(","):
            init_dir = make_init(init, work / f"init-{init}", tokenizer)
            for case, pooling in cases:
                parity(args, init, case, pooling, init_dir, data, work)


if __name__ == "__main__":
    main()
