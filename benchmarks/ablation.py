"""The paper's ablation in miniature (issue 24): MLM, RetroMAE and DupMAE pre-training of one small BERT from random
init (or of the --init_model checkpoint) at the same budget, then the same fine-tuning; every variant scored zero-shot
and fine-tuned.

    python benchmarks/ablation.py --output_dir runs/ablation                        # defaults: 2 seeds, 5 variants
    python benchmarks/ablation.py --output_dir runs/abl-short --variants mlm,dupmae --steps 100 --seeds 1
    python benchmarks/ablation.py --output_dir /tmp/abl --smoke    # tiny model and data, every stage, a minute or two
    python benchmarks/ablation.py --output_dir OUT --datasets BEIR_DIR... [--general_corpus books.jsonl]
    # from a masked-LM checkpoint (a folder, or a hub name in the local HF cache), its own tokenizer and config:
    python benchmarks/ablation.py --output_dir OUT --init_model bert-base-uncased
    # on 2 cores, one process per seed with one thread each, then the table from both (every stage reused):
    OMP_NUM_THREADS=1 python benchmarks/ablation.py --output_dir OUT --seeds 1 --first_seed 42 &
    OMP_NUM_THREADS=1 python benchmarks/ablation.py --output_dir OUT --seeds 1 --first_seed 43; wait
    python benchmarks/ablation.py --output_dir OUT

Stages, variants and what they share: `experiments/ablation.py`. Test sets: ../shared SciFact (when present), the
offline docstring set, and every BEIR folder given with --datasets. Output in OUTPUT_DIR: one JSON line per cell on
stdout and in results.jsonl ({"bench": "ablation", "variant", "dataset", "stage", "representation", "metric",
"ours", "baseline" (the mlm cell of the same row), "ratio", "seeds", "spread", ...}); results.md (tables, stage
minutes, verdict); curves.png (each variant's loss terms and the retrieval probe per step, first seed); one folder
per seed and variant. A finished stage is reused when the script runs again with the same options and inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import smoke  # noqa: E402
from experiments.ablation import Ablation, AblationConfig, resolve_init_model  # noqa: E402
from experiments.ablation_report import markdown, report_lines, verdict  # noqa: E402
from experiments.variants import VARIANTS, parse_variants  # noqa: E402

logger = logging.getLogger("ablation")

SHARED = REPO.parent / "shared" / "data"
#: --smoke: a model and data small enough that every stage of every variant runs in seconds.
SMOKE = {"seeds": 1, "vocab_size": 200, "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
         "intermediate_size": 64, "max_steps": 2, "per_device_train_batch_size": 4, "max_seq_length": 64,
         "probe_steps": 1, "finetune_steps": 2, "finetune_batch_size": 4, "max_length": 64}


def parse_args(argv: list[str] | None) -> tuple[AblationConfig, bool]:
    """(the config, whether --smoke was given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = AblationConfig(output_dir="")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--datasets", nargs="*", default=[], help="more BEIR test folders")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    for name, value in asdict(defaults).items():
        if name in ("output_dir", "datasets", "variants"):
            continue
        aliases = ["--steps"] if name == "max_steps" else []
        parser.add_argument(f"--{name}", *aliases, type=type(value), default=value, dest=name)
    args = vars(smoke.parse_args(parser, argv, **SMOKE))
    smoke_mode = args.pop("smoke")
    try:
        args["variants"] = parse_variants(args["variants"])
        return AblationConfig(**args), smoke_mode
    except ValueError as exc:
        parser.error(str(exc))


def default_datasets(out: Path, smoke_mode: bool) -> list[Path]:
    """../shared SciFact when present, and the offline docstring set (built into OUTPUT_DIR/data); with --smoke a
    tiny BEIR folder instead."""
    from demo.docstring_corpus import build

    if smoke_mode:
        tiny = out / "data" / "tiny"
        return [tiny if (tiny / "corpus.jsonl").is_file() else smoke.tiny_beir(tiny)]
    docstrings = out / "data" / "docstrings"
    if not (docstrings / "corpus.jsonl").is_file():
        build(docstrings)
    scifact = SHARED / "scifact"
    return ([scifact] if (scifact / "corpus.jsonl").is_file() else []) + [docstrings]


def general_corpus(cfg: AblationConfig, out: Path, smoke_mode: bool) -> Path | None:
    if smoke_mode and not cfg.general_corpus:
        return smoke.tiny_books(out / "data" / "books.jsonl")
    if cfg.general_corpus:
        path = Path(cfg.general_corpus).resolve()
        if not path.is_file():
            raise SystemExit(f"error: --general_corpus {path}: no such file")
        return path
    books = SHARED / "gutenberg" / "books-25MB.jsonl"
    return books if books.is_file() else None


def main(argv: list[str] | None = None) -> None:
    from common.logging_setup import setup_logging
    from experiments.curves import plot_curves

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg, smoke_mode = parse_args(argv)
    out = Path(cfg.output_dir).resolve()
    cfg.output_dir = str(out)
    start_from = cfg.init_model or "random init"  # as the user named it: a hub name's snapshot folder is a hash
    if cfg.init_model:  # its folder (a hub name's cached snapshot), before any work and before chdir
        try:
            cfg.init_model = str(resolve_init_model(cfg.init_model))
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    general = general_corpus(cfg, out, smoke_mode)
    datasets = default_datasets(out, smoke_mode) + [Path(d).resolve() for d in cfg.datasets]
    os.chdir(REPO)  # stages run the repository's entry points by relative path
    logger.info("test sets: %s; general corpus: %s; start: %s", [d.name for d in datasets], general,
                cfg.init_model or "random init")
    start = time.perf_counter()
    ablation = Ablation(cfg, datasets, general)
    with contextlib.redirect_stdout(sys.stderr):  # the stages' streamed output; stdout carries the JSON lines only
        results = ablation.run()
        references = ablation.references()
    minutes = (time.perf_counter() - start) / 60
    lines = report_lines(results, references)
    runs = {v: out / f"seed-{cfg.first_seed}" / v / "pretrain" / "metrics.jsonl" for v in cfg.variants}
    plot_curves({v: path for v, path in runs.items() if path.is_file()}, out / "curves.png",
                f"pre-training from {start_from}, {cfg.max_steps} steps")
    stage_minutes = "\n".join(f"| {name} | {seconds / 60:.1f} |" for name, seconds in ablation.seconds.items())
    (out / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (out / "results.md").write_text(
        f"## Verdict\n\n{verdict(lines)}\n\n## Tables\n\n{markdown(lines)}\n\n## Minutes per stage\n\n"
        f"| stage | minutes |\n|---|---|\n{stage_minutes}\n\nThis run: {minutes:.1f} min on {os.cpu_count()} cores "
        f"(stages reused from earlier runs count their original time above, not in this total).\n\n"
        f"Config: `{json.dumps(asdict(cfg))}`\n")
    (out / "stage_seconds.json").write_text(json.dumps({**ablation.seconds, "total": minutes * 60}, indent=2) + "\n")
    for line in lines:
        print(json.dumps(line))
    logger.info("done in %.1f min; %s/results.md", minutes, out)


if __name__ == "__main__":
    main()
