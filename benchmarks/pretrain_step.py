"""Seconds per optimizer step and peak memory: our DupMAEModel vs the official DupMAEForPretraining.

    python benchmarks/pretrain_step.py --threads 1 --repeats 3 \
        --official_src RetroMAE/src --official_python /path/to/venv-transformers-4.46.3/bin/python
    python benchmarks/pretrain_step.py --threads 1 --repeats 3     # no official code: the re-implementation
    python benchmarks/pretrain_step.py --smoke      # seq 32, batch 2, 1 step, 1 round (with --official_src too)

Baselines (the `baseline_name` of each JSON line):
- `official`: staoxiao/RetroMAE's own DupMAEForPretraining (src/pretrain/modeling_duplex.py and the files it
  imports), from a local copy (--official_src), run by --official_python: a venv with the transformers it
  was written for (4.46.3 and torch 2.13.0 CPU were used) (`benchmarks/official_dupmae.py`).
- `full_logits`: `benchmarks/full_logits.py`, the official losses and decoder attention re-implemented
  around our modules, run in our environment (transformers 5). It is the baseline when no --official_src is
  given, and runs beside the official one otherwise: its lines against `official` show how close it is.

Protocol: this process collates the batches once (Gutenberg text from ../shared/data, random ids without
it; our collator) and saves them; every variant runs in a fresh process per round: build the model,
AdamW, one untimed warm-up step, then --steps timed steps, all on those batches in fp32. Peak memory is
that process's own peak RSS (VmHWM, `common.memory`: imports, model, optimizer state and the steps; not
ru_maxrss, which a child inherits from this parent) on CPU, the peak
allocated CUDA memory on GPU. Variants alternate for --repeats rounds and each figure is the minimum over
rounds (wall seconds per step, CPU seconds per step, peak memory), so load from other processes hits all
variants alike. Our model runs twice, with and without `gradient_checkpointing`, and starts as
`pretrain/main.py` does (`common.host_allocator`); the baselines run with the process defaults, or with
--baseline_env. Weights: the packaged all-MiniLM-L6-v2 for all; each initializes the missing MLM head (and
the decoder) itself, so losses differ a little.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import smoke  # noqa: E402
from common.memory import peak_rss_bytes  # noqa: E402

#: Our model's variants and their gradient_checkpointing setting.
OURS = {"ours": True, "ours_no_checkpointing": False}
#: The loss weight of the BoW term, the same for every variant (the official recipe uses 0.1; no effect on cost).
BOW_WEIGHT = 1.0


def build_variant(args: argparse.Namespace, batches: list[dict]):
    """(module, the batches in its format, module output -> loss) for args.variant."""
    import torch

    torch.manual_seed(0)
    if args.variant == "official":
        from benchmarks.official_dupmae import load_official, official_batch

        model = load_official(args.official_src, args.model_name_or_path, BOW_WEIGHT)
        return model, [official_batch(b, model.lm.config.vocab_size) for b in batches], lambda out: out[0]
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    if args.variant == "full_logits":
        from benchmarks.full_logits import FullLogitsDupMAE

        model = DupMAEModel.from_pretrained(args.model_name_or_path, DupMAEConfig(cpu_attention=False,
                                                                                  bow_weight=BOW_WEIGHT))
        return FullLogitsDupMAE(model), batches, lambda out: out
    config = DupMAEConfig(gradient_checkpointing=OURS[args.variant], bow_weight=BOW_WEIGHT)
    return DupMAEModel.from_pretrained(args.model_name_or_path, config), batches, lambda out: out.loss


def run_variant(args: argparse.Namespace) -> dict:
    """Build the variant, take warm-up + timed steps, return {sec_per_step, cpu_sec_per_step, peak_bytes, loss}."""
    if args.variant in OURS:
        from common.host_allocator import configure_host_allocator

        configure_host_allocator()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    module, batches, loss_of = build_variant(args, torch.load(args.batches))
    module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(module(**{k: v.to(device) for k, v in batch.items()}))
        loss.backward()
        optimizer.step()
        return loss.item()

    step(batches[0])
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = [step(batch) for batch in batches[1:]]
    seconds = (time.perf_counter() - start) / args.steps
    cpu_seconds = (time.process_time() - cpu_start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss_bytes()
    return {"sec_per_step": seconds, "cpu_sec_per_step": cpu_seconds, "peak_bytes": peak, "loss": losses[-1]}


def save_batches(args: argparse.Namespace, path: str) -> None:
    """Collate warm-up + timed batches of shard-like blocks with our collator; torch.save them to path."""
    import torch

    from benchmarks.collator import make_blocks
    from common.tokenizer import load_tokenizer
    from pretrain.collator import CollatorConfig, DupMAECollator

    tokenizer = load_tokenizer(args.model_name_or_path)
    collator = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.seq_len))
    rows = make_blocks(tokenizer, args.batch_size * (args.steps + 1), args.seq_len - 2, seed=0)
    torch.save([collator(rows[i:i + args.batch_size], torch.Generator().manual_seed(i))
                for i in range(0, len(rows), args.batch_size)], path)


def parse_env(pairs: list[str]) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {KEY: VALUE}."""
    if any("=" not in pair for pair in pairs):
        raise SystemExit(f"--baseline_env takes KEY=VALUE, got {pairs}")
    return dict(pair.split("=", 1) for pair in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the minimum counts")
    parser.add_argument("--official_src", help="the official RetroMAE `src` folder (or its `src/pretrain`)")
    parser.add_argument("--official_python", default=sys.executable,
                        help="Python that runs the official code (a venv with transformers 4.x)")
    parser.add_argument("--baseline_env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="environment for the baseline processes only (e.g. allocator settings)")
    parser.add_argument("--variant", choices=[*OURS, "full_logits", "official"], help=argparse.SUPPRESS)  # child
    parser.add_argument("--batches", help=argparse.SUPPRESS)  # child: the saved batches
    args = smoke.parse_args(parser, seq_len=32, batch_size=2, steps=1, repeats=1, threads=1)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    from common.defaults import resolve_model

    args.model_name_or_path = resolve_model(args.model_name_or_path)  # one path for both Pythons
    baselines = ["official", "full_logits"] if args.official_src else ["full_logits"]
    fallback_note = "no --official_src: the baseline is the re-implementation benchmarks/full_logits.py"
    if not args.official_src:
        print(f"pretrain_step: {fallback_note}", file=sys.stderr)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    baseline_env = {**env, **parse_env(args.baseline_env)}
    runs: dict[str, list[dict]] = {variant: [] for variant in (*OURS, *baselines)}
    with tempfile.TemporaryDirectory() as tmp:
        batches = os.path.join(tmp, "batches.pt")
        save_batches(args, batches)
        for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits every variant
            for variant in runs:
                python = args.official_python if variant == "official" else sys.executable
                child = subprocess.run([python, __file__, *sys.argv[1:], "--model_name_or_path",
                                        args.model_name_or_path, "--variant", variant, "--batches", batches],
                                       env=env if variant in OURS else baseline_env, capture_output=True, text=True)
                if child.returncode:
                    raise SystemExit(f"{variant} run failed:\n{child.stderr[-3000:]}")
                runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    results = {variant: {key: min(run[key] for run in variant_runs) for key in variant_runs[0]}
               for variant, variant_runs in runs.items()}
    common = {"model": "all-MiniLM-L6-v2 (packaged)" if args.model_name_or_path == resolve_model(None)
              else args.model_name_or_path, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "steps": args.steps, "repeats": args.repeats, "threads": args.threads or "default",
              "device": args.device, "smoke": args.smoke}
    if args.baseline_env:
        common["baseline_env"] = parse_env(args.baseline_env)
    if not args.official_src:
        common["note"] = fallback_note
    memory = "peak_rss" if args.device == "cpu" else "peak_allocated"
    figures = (("time_per_step", "s", "sec_per_step", 1.0), ("cpu_time_per_step", "CPU s", "cpu_sec_per_step", 1.0),
               (memory, "MiB", "peak_bytes", 2**-20))
    compared = [(variant, baselines[0]) for variant in OURS]
    if args.official_src:  # how close the re-implementation comes to the official code
        compared.append(("full_logits", "official"))
    for variant, baseline in compared:
        ours, base = results[variant], results[baseline]
        for metric, unit, key, scale in figures:
            print(json.dumps({"bench": "pretrain_step", "metric": metric, "unit": unit,
                              "ours": round(ours[key] * scale, 3), "baseline": round(base[key] * scale, 3),
                              "ratio": round(ours[key] / base[key], 3), "better": "lower", "variant": variant,
                              "baseline_name": baseline, "gradient_checkpointing": OURS.get(variant),
                              "loss_ours": round(ours["loss"], 4), "loss_baseline": round(base["loss"], 4), **common}))


if __name__ == "__main__":
    main()
