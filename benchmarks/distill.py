"""Does learning from a teacher help (issue 31)? The packaged MiniLM fine-tuned with the same negatives, steps and
seed three ways: without a teacher; distilled from the fusion teacher (the base model fused with BM25 by reciprocal
rank, the training-free row the fine-tuned models have not beaten); distilled from the base bi-encoder itself (the
control for "any teacher helps"). Every model scored zero-shot / fine-tuned on every test set, 2 seeds.

    python benchmarks/distill.py --output_dir runs/distill                       # SciFact (when present), docstrings
    python benchmarks/distill.py --output_dir runs/distill --datasets BEIR_DIR... # more test sets, only scored
    python benchmarks/distill.py --output_dir /tmp/distill --smoke               # tiny data and BERT, every stage
    # 2 cores, one process per seed with one thread each, then the table from both (every stage reused):
    OMP_NUM_THREADS=1 python benchmarks/distill.py --output_dir OUT --seeds 1 --first_seed 42 &
    OMP_NUM_THREADS=1 python benchmarks/distill.py --output_dir OUT --seeds 1 --first_seed 43; wait
    python benchmarks/distill.py --output_dir OUT

Stages (each a logged, reusable subprocess, `experiments.stages`): the fine-tuning set (the training queries of
SciFact and the docstring set in one BEIR folder, ids prefixed); hard negatives mined with the base model
(`finetune.mine_negatives`); the two teachers' scores of every (query, positive or negative) pair
(`finetune.teacher_scores --scorer fusion|bi-encoder`); per seed and variant a fine-tuning run
(`finetune/main.py`, `mean` cosine, temperature 0.05; the teachers with `--teacher_temperature` and
`--contrastive_loss_weight`). Test queries against the whole corpus, documents at --max_length tokens.
Output: one JSON line per cell on stdout and in OUTPUT_DIR/results.jsonl: {"bench": "distill", "dataset" (or
"average", per seed then over seeds), "variant": zero-shot | no-teacher | fusion-teacher | self-teacher |
teacher (the fusion teacher's own score), "metric": "nDCG@10", "ours" (mean over seeds), "per_seed", "spread"
(max - min), "baseline" (the no-teacher cell), "ratio", ...}; OUTPUT_DIR/results.md (the table).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import smoke  # noqa: E402

logger = logging.getLogger("distill")

SHARED = REPO.parent / "shared" / "data"
TRAINED = ("no-teacher", "fusion-teacher", "self-teacher")
VARIANTS = ("zero-shot", *TRAINED, "teacher")
AVERAGE = "average"
SMOKE = {"seeds": 1, "steps": 2, "batch_size": 4, "train_group_size": 3, "max_length": 32, "depth": 12,
         "skip_top": 1, "bf16": "false"}  # fp32: the export skips DeepSpeed's fp32 reconstruction


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--datasets", nargs="*", default=[], help="more BEIR test folders (only scored)")
    parser.add_argument("--model", default="default", help="the base model (default: the packaged MiniLM)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first_seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every fine-tuning run")
    parser.add_argument("--batch_size", type=int, default=16, help="queries per step")
    parser.add_argument("--train_group_size", type=int, default=4, help="1 positive + mined negatives per query")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--max_length", type=int, default=128, help="passage tokens in training, mining, scoring")
    parser.add_argument("--depth", type=int, default=200, help="mining: documents retrieved per training query")
    parser.add_argument("--skip_top", type=int, default=3, help="mining: best non-positive documents skipped")
    parser.add_argument("--teacher_temperature", type=float, default=0.05,
                        help="both teachers' scores are cosine-like (fusion: RRF x (k+1)/2 in (0, 1])")
    parser.add_argument("--contrastive_loss_weight", type=float, default=1.0, help="loss = KL + this x InfoNCE")
    parser.add_argument("--bf16", default="auto")
    args = smoke.parse_args(parser, argv, **SMOKE)
    if args.seeds < 1 or args.steps < 1:
        parser.error("need --seeds >= 1 and --steps >= 1")
    return args


def _python(*argv: str) -> list[str]:
    return ["python", *argv]


def test_sets(out: Path, smoke_mode: bool, extra: list[str]) -> tuple[list[Path], list[Path]]:
    """(training sets, test sets): ../shared SciFact when present and the docstring set (built by its own module's
    command), or the tiny smoke folder; --datasets are test sets only."""
    if smoke_mode:
        tiny = out / "data" / "tiny"
        train = [tiny if (tiny / "corpus.jsonl").is_file() else smoke.tiny_beir(tiny)]
    else:
        docstrings = out / "data" / "docstrings"
        if not (docstrings / "corpus.jsonl").is_file():
            subprocess.run([sys.executable, "-m", "demo.docstring_corpus", str(docstrings)], check=True, cwd=REPO,
                           stdout=sys.stderr)
        scifact = SHARED / "scifact"
        train = ([scifact] if (scifact / "corpus.jsonl").is_file() else []) + [docstrings]
    return train, train + [Path(d).resolve() for d in extra]


class Distill:
    """The stages, run (or reused) in order; `scores()` reads or computes every cell."""

    def __init__(self, args: argparse.Namespace, train_sets: list[Path], out: Path):
        self.args, self.train_sets, self.out = args, train_sets, out
        self.seconds: dict[str, float] = {}

    def _stage(self, name: str, command: list[str], output: Path, inputs: tuple[Path, ...]) -> Path:
        from experiments.stages import Stage, run_stage

        self.seconds[name] = run_stage(Stage(name, command, output, inputs=inputs), self.out / "logs")
        return output

    def prepare(self) -> None:
        """The fine-tuning set, its mined negatives and both teachers' scores (shared by every seed)."""
        from experiments.ablation import build_pairs
        from experiments.stages import fingerprint

        a, data = self.args, self.out / "data"
        self.pairs = data / "finetune_pairs"
        key = json.dumps({str(d): fingerprint(d) for d in self.train_sets})
        if not (self.pairs / "key.json").is_file() or (self.pairs / "key.json").read_text() != key:
            build_pairs(self.train_sets, self.pairs)
            (self.pairs / "key.json").write_text(key)
        lengths = ("--query_max_length", "32", "--passage_max_length", str(a.max_length))
        mined = self.out / "negatives"
        self._stage("mine", _python("-m", "finetune.mine_negatives", "--model", a.model, "--data_dir", str(self.pairs),
                                    "--out", str(mined / "negatives.jsonl"), "--representation", "mean",
                                    "--normalize", "true", "--depth", str(a.depth), "--skip_top", str(a.skip_top),
                                    "--bf16", a.bf16, *lengths), mined, (self.pairs,))
        self.negatives = mined / "negatives.jsonl"
        self.teachers = {}
        for variant, scorer in (("fusion-teacher", "fusion"), ("self-teacher", "bi-encoder")):
            folder = self.out / "teachers" / scorer
            self._stage(f"teacher-{scorer}", _python(
                "-m", "finetune.teacher_scores", "--scorer", scorer, "--model", a.model, "--data_dir", str(self.pairs),
                "--negatives", str(self.negatives), "--out", str(folder / "scores.txt"), "--representation", "mean",
                "--normalize", "true", "--bf16", a.bf16, "--overwrite", *lengths), folder, (self.pairs, mined))
            self.teachers[variant] = folder / "scores.txt"

    def finetune(self, seed: int, variant: str) -> Path:
        a = self.args
        out = self.out / f"seed-{seed}" / variant
        command = ["python", "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json", "--model_name_or_path",
                   a.model, "--representation", "mean", "--normalize", "true", "--temperature", "0.05", "--data_dir",
                   str(self.pairs), "--negatives", str(self.negatives), "--train_group_size", str(a.train_group_size),
                   "--per_device_train_batch_size", str(a.batch_size), "--max_steps", str(a.steps), "--learning_rate",
                   str(a.learning_rate), "--query_max_length", "32", "--passage_max_length", str(a.max_length),
                   "--logging_steps", "5", "--save_steps", "100000", "--seed", str(seed), "--bf16", a.bf16,
                   "--output_dir", str(out)]
        inputs = [self.pairs, self.negatives.parent]
        if variant in self.teachers:
            command += ["--teacher_scores", str(self.teachers[variant]), "--teacher_temperature",
                        str(a.teacher_temperature), "--contrastive_loss_weight", str(a.contrastive_loss_weight)]
            inputs.append(self.teachers[variant].parent)
        self._stage(f"s{seed}-{variant}", command, out, tuple(inputs))
        return out / "model"

    def score(self, name: str, dataset: Path, compute):
        """nDCG@10 of one cell ({row: nDCG@10} for a dict of rows), cached in OUTPUT_DIR/scores by name."""
        path = self.out / "scores" / f"{name}--{dataset.name}.json"
        if not path.is_file():
            start = time.perf_counter()
            metrics = compute()
            self.seconds[f"score {name} {dataset.name}"] = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics) + "\n")
        metrics = json.loads(path.read_text())
        return metrics["nDCG@10"] if "nDCG@10" in metrics else {row: m["nDCG@10"] for row, m in metrics.items()}


def base_scores(model: str, dataset: Path, max_length: int) -> dict[str, dict[str, float]]:
    """{"zero-shot": metrics, "teacher-fusion": metrics} from one encoding of the test split: the base model's own
    ranking, and it fused with BM25 by reciprocal rank (the computation of `experiments.scoring.fused_scores`)."""
    from common.representation import Encoder
    from common.tokenizer import load_tokenizer
    from evaluation.compare import rank_representations
    from evaluation.data import load_beir
    from evaluation.fusion import bm25_run, reciprocal_rank_fusion
    from evaluation.metrics import evaluate
    from experiments.scoring import DEPTH, QUERY_MAX_LENGTH

    data = load_beir(dataset, "test")
    dense = rank_representations({"own": Encoder.from_pretrained(model)}, load_tokenizer(model), data,
                                 max_length=max_length, query_max_length=QUERY_MAX_LENGTH, depth=DEPTH)["own"]
    return {"zero-shot": evaluate(data.qrels, dense),
            "teacher-fusion": evaluate(data.qrels, reciprocal_rank_fusion([dense, bm25_run(data, DEPTH)], 60, DEPTH))}


def run(args: argparse.Namespace, out: Path) -> tuple[list[dict], Distill]:
    from experiments.scoring import evaluate_model

    train_sets, tests = test_sets(out, args.smoke, args.datasets)
    if args.smoke and args.model == "default":  # a model every stage loads, trains and checkpoints in a second
        args.model = str(smoke.tiny_bert(out / "data" / "tiny_bert"))
    distill = Distill(args, train_sets, out)
    distill.prepare()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    models = {(seed, variant): distill.finetune(seed, variant) for seed in seeds for variant in TRAINED}
    base = args.model
    cells: dict[str, dict[str, list[float]]] = {}
    for dataset in tests:
        row = cells.setdefault(dataset.name, {})
        both = distill.score("base", dataset, lambda: base_scores(base, dataset, args.max_length))
        zero, teacher = both["zero-shot"], both["teacher-fusion"]
        row["zero-shot"], row["teacher"] = [zero] * len(seeds), [teacher] * len(seeds)
        for variant in TRAINED:
            row[variant] = [distill.score(f"s{seed}-{variant}", dataset,
                                          lambda m=models[seed, variant]: evaluate_model(str(m), dataset,
                                                                                         args.max_length, 0)["mean"])
                            for seed in seeds]
    return report_lines(cells, args.smoke, len(seeds)), distill


def report_lines(cells: dict[str, dict[str, list[float]]], smoke_mode: bool, seeds: int) -> list[dict]:
    """One line per (dataset or average, variant): mean over seeds, per seed, spread, against no-teacher."""
    names = list(cells)
    if len(names) > 1:  # per seed over the test sets, then over seeds
        cells = {**cells, AVERAGE: {v: [statistics.fmean(cells[n][v][s] for n in names) for s in range(seeds)]
                                    for v in VARIANTS}}
    lines = []
    for dataset, row in cells.items():
        baseline = statistics.fmean(row["no-teacher"])
        for variant in VARIANTS:
            values = row[variant]
            ours = statistics.fmean(values)
            lines.append({"bench": "distill", "dataset": dataset, "variant": variant, "metric": "nDCG@10",
                          "unit": "nDCG@10", "ours": round(ours, 4), "per_seed": [round(v, 4) for v in values],
                          "spread": round(max(values) - min(values), 4), "baseline": round(baseline, 4),
                          "baseline_cell": "no-teacher", "ratio": round(ours / baseline, 4) if baseline else None,
                          "better": "higher", "seeds": len(values), "smoke": smoke_mode})
    return lines


def markdown(lines: list[dict]) -> str:
    datasets = list(dict.fromkeys(line["dataset"] for line in lines))
    cell = {(line["dataset"], line["variant"]): line for line in lines}
    rows = ["| variant | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for variant in VARIANTS:
        rows.append(f"| {variant} | " + " | ".join(
            f"{cell[d, variant]['ours']:.4f} (±{cell[d, variant]['spread']:.4f})" for d in datasets) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from common.logging_setup import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)  # stages run the repository's entry points by relative path
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the stages' streamed output; stdout carries the JSON lines only
        lines, distill = run(args, out)
    minutes = (time.perf_counter() - start) / 60
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    stage_minutes = "\n".join(f"| {name} | {seconds / 60:.1f} |" for name, seconds in distill.seconds.items())
    (out / "results.md").write_text(
        f"## nDCG@10 (mean over seeds, ± max - min)\n\n{markdown(lines)}\n\n## Minutes per stage\n\n"
        f"| stage | minutes |\n|---|---|\n{stage_minutes}\n\nThis run: {minutes:.1f} min on {os.cpu_count()} cores. "
        f"Settings: `{json.dumps(vars(args))}`\n")
    for line in lines:
        print(json.dumps(line))
    logger.info("done in %.1f min; %s/results.md", minutes, out)


if __name__ == "__main__":
    main()
