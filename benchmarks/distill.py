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
`--contrastive_loss_weight`). Test queries against the whole corpus, documents at --max_length tokens, encoded under
--bf16 (auto: bf16 autocast where the CPU has it natively, as training). Processes running at once (one per seed)
share the cells that do not depend on the seed: a lock file makes one compute them and the others wait.
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
    parser.add_argument("--variants", default=",".join(TRAINED), help=f"fine-tuned variants: subset of {TRAINED}")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: the table from the cells earlier runs of OUTPUT_DIR scored (seeds given)")
    args = smoke.parse_args(parser, argv, **SMOKE)
    if args.seeds < 1 or args.steps < 1:
        parser.error("need --seeds >= 1 and --steps >= 1")
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or set(args.variants) - set(TRAINED):
        parser.error(f"--variants: a comma-separated subset of {','.join(TRAINED)}")
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


@contextlib.contextmanager
def _cell_lock(lock: Path):
    """Yields True when this process holds `lock` (created with O_EXCL, holding our pid), False when a live process
    does; a lock whose process is gone is taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            alive = True
        except (ProcessLookupError, ValueError, FileNotFoundError):
            alive = False
        if not alive:
            lock.unlink(missing_ok=True)
        yield False
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


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
        """nDCG@10 of one cell ({row: nDCG@10} for a dict of rows), cached in OUTPUT_DIR/scores by name. A cell
        another process is computing (its lock file names a live pid) is waited for, not computed twice."""
        path = self.out / "scores" / f"{name}--{dataset.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        while not path.is_file():
            with _cell_lock(path.with_suffix(".lock")) as mine:
                if mine and not path.is_file():
                    start = time.perf_counter()
                    metrics = compute()
                    self.seconds[f"score {name} {dataset.name}"] = time.perf_counter() - start
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(metrics) + "\n")
                    tmp.replace(path)
            if not path.is_file():
                time.sleep(10)
        return self.cached(name, dataset)

    def cached(self, name: str, dataset: Path):
        """A scored cell (as `score` returns it), or None when no run scored it."""
        path = self.out / "scores" / f"{name}--{dataset.name}.json"
        if not path.is_file():
            return None
        metrics = json.loads(path.read_text())
        return metrics["nDCG@10"] if "nDCG@10" in metrics else {row: m["nDCG@10"] for row, m in metrics.items()}


def ranking(model: str, dataset: Path, max_length: int, bf16: bool):
    """(the test split, the model's top-DEPTH run): mean pooling + cosine (the packaged MiniLM's own), documents at
    max_length tokens, queries at experiments.scoring's length, exact search; encoded under bf16 autocast when the
    CPU has native bf16 (AMX here: half the CPU time; every cell of the table is encoded the same way)."""
    from common.representation import Encoder, RepresentationConfig
    from common.tokenizer import load_tokenizer
    from evaluation.data import load_beir
    from evaluation.encode import encode_texts
    from evaluation.search import search
    from experiments.scoring import DEPTH, QUERY_MAX_LENGTH

    data = load_beir(dataset, "test")
    encoder = Encoder.from_pretrained(model, RepresentationConfig(kind="mean", normalize=True)).eval()
    tokenizer, options = load_tokenizer(model), {"max_tokens": 8192, "batch_size": 128, "bf16": bf16}
    docs = encode_texts(encoder, tokenizer, data.doc_ids, data.doc_texts, documents=True, max_length=max_length,
                        desc=f"{data.name} corpus", **options)
    queries = encode_texts(encoder, tokenizer, data.query_ids, data.query_texts, documents=False,
                           max_length=QUERY_MAX_LENGTH, desc=f"{data.name} queries", **options)
    return data, search(queries, docs, DEPTH)


def model_scores(model: str, dataset: Path, max_length: int, bf16: bool) -> dict[str, float]:
    from evaluation.metrics import evaluate

    data, run = ranking(model, dataset, max_length, bf16)
    return evaluate(data.qrels, run)


def base_scores(model: str, dataset: Path, max_length: int, bf16: bool) -> dict[str, dict[str, float]]:
    """{"zero-shot": metrics, "teacher-fusion": metrics} from one encoding of the test split: the base model's
    ranking, and it fused with BM25 (common.bm25's standard one) by reciprocal rank, k = 60, as `--fuse bm25`."""
    from evaluation.fusion import bm25_run, reciprocal_rank_fusion
    from evaluation.metrics import evaluate
    from experiments.scoring import DEPTH

    data, dense = ranking(model, dataset, max_length, bf16)
    return {"zero-shot": evaluate(data.qrels, dense),
            "teacher-fusion": evaluate(data.qrels, reciprocal_rank_fusion([dense, bm25_run(data, DEPTH)], 60, DEPTH))}


def run(args: argparse.Namespace, out: Path) -> tuple[list[dict], Distill]:
    from common.precision import decide_bf16

    train_sets, tests = test_sets(out, args.smoke, args.datasets)
    if args.smoke and args.model == "default":  # a model every stage loads, trains and checkpoints in a second
        args.model = str(smoke.tiny_bert(out / "data" / "tiny_bert"))
    distill = Distill(args, train_sets, out)
    distill.prepare()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.report_only:  # the table from the cells earlier runs scored
        cells = {d.name: {v: {s: distill.cached(f"s{s}-{v}", d) for s in seeds} for v in TRAINED} for d in tests}
        for dataset in tests:
            both = distill.cached("base", dataset) or {}
            cells[dataset.name].update({"zero-shot": {0: both.get("zero-shot")}, "teacher": {0: both.get("teacher-fusion")}})
        return report_lines(cells, args.smoke), distill
    distill.prepare()
    models = {(seed, variant): distill.finetune(seed, variant) for seed in seeds for variant in args.variants}
    base, bf16 = args.model, decide_bf16(args.bf16).enabled
    cells: dict[str, dict[str, dict[int, float]]] = {}
    for dataset in tests:  # the trained models first: parallel per-seed processes then meet at the shared cells
        cells[dataset.name] = {variant: {seed: distill.score(f"s{seed}-{variant}", dataset, lambda m=models[seed, variant]:
                                                             model_scores(str(m), dataset, args.max_length, bf16))
                                         for seed in seeds} for variant in args.variants}
    for dataset in tests:
        both = distill.score("base", dataset, lambda: base_scores(base, dataset, args.max_length, bf16))
        cells[dataset.name].update({"zero-shot": {0: both["zero-shot"]}, "teacher": {0: both["teacher-fusion"]}})
    return report_lines(cells, args.smoke), distill


def report_lines(cells: dict[str, dict[str, dict[int, float | None]]], smoke_mode: bool) -> list[dict]:
    """One line per (dataset or average, variant) with a score: mean over its seeds, per seed, spread, against the
    no-teacher cell. The zero-shot and teacher rows do not depend on a seed (one value). `average`: per seed over
    the test sets (seeds every test set has), then over seeds."""
    cells = {d: {v: {s: x for s, x in per_seed.items() if x is not None} for v, per_seed in row.items()}
             for d, row in cells.items()}
    names = list(cells)
    if len(names) > 1:
        cells[AVERAGE] = {}
        for variant in VARIANTS:
            common = set.intersection(*(set(cells[n].get(variant, {})) for n in names))
            cells[AVERAGE][variant] = {s: statistics.fmean(cells[n][variant][s] for n in names) for s in sorted(common)}
    lines = []
    for dataset, row in cells.items():
        baseline = statistics.fmean(row["no-teacher"].values()) if row.get("no-teacher") else None
        for variant in VARIANTS:
            values = list(row.get(variant, {}).values())
            if not values:
                continue
            ours = statistics.fmean(values)
            lines.append({"bench": "distill", "dataset": dataset, "variant": variant, "metric": "nDCG@10",
                          "unit": "nDCG@10", "ours": round(ours, 4), "per_seed": [round(v, 4) for v in values],
                          "spread": round(max(values) - min(values), 4),
                          "baseline": round(baseline, 4) if baseline is not None else None,
                          "baseline_cell": "no-teacher", "ratio": round(ours / baseline, 4) if baseline else None,
                          "better": "higher", "seeds": len(values), "smoke": smoke_mode})
    return lines


def markdown(lines: list[dict]) -> str:
    datasets = list(dict.fromkeys(line["dataset"] for line in lines))
    cell = {(line["dataset"], line["variant"]): line for line in lines}
    rows = ["| variant | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for variant in VARIANTS:
        rows.append(f"| {variant} | " + " | ".join(
            f"{cell[d, variant]['ours']:.4f} ({cell[d, variant]['seeds']} seed(s), spread {cell[d, variant]['spread']:.4f})"
            if (d, variant) in cell else "" for d in datasets) + " |")
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
