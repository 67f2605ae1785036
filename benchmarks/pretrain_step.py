"""Seconds per optimizer step and peak memory: our DupMAEModel vs the full-logits (official-style) baseline.

    python benchmarks/pretrain_step.py [--model_name_or_path M] [--seq_len 256] [--batch_size 8] [--steps 3]
        [--device cpu|cuda]

Each variant runs in its own subprocess so the peak-memory high-water marks do not mix: peak RSS
(ru_maxrss) on CPU, peak allocated CUDA memory on GPU. Variants alternate for --repeats rounds and each
figure is the minimum over rounds (wall seconds per step, process CPU seconds per step, peak memory), so
load from other processes on a shared machine hits both. Both variants load the same weights (the packaged
all-MiniLM-L6-v2 by default; its missing MLM head is initialized from the same seed), see the same
collated batches of Gutenberg text (random ids without ../shared/data) and take AdamW steps in fp32;
one untimed warm-up step precedes the timed ones. The baseline wraps the same DupMAEModel built with
`cpu_attention=False`, i.e. HF's SDPA attention as the official code has it. Our model runs twice, with and without
`gradient_checkpointing`, so both trade-offs come from the same run; prints one JSON line per figure and
variant (wall time, CPU time, memory), each with its "gradient_checkpointing" setting.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Our model's variants and their gradient_checkpointing setting; "baseline" is the full-logits model.
OURS = {"ours": True, "ours_no_checkpointing": False}


def run_variant(args: argparse.Namespace) -> dict:
    """Build the variant, take warm-up + timed steps, return {sec_per_step, peak_bytes, loss}."""
    from benchmarks.collator import make_blocks
    from benchmarks.full_logits import FullLogitsDupMAE
    from common.tokenizer import load_tokenizer
    from pretrain.collator import CollatorConfig, DupMAECollator
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model_name_or_path)
    torch.manual_seed(0)
    ours = args.variant in OURS
    config = DupMAEConfig(gradient_checkpointing=OURS[args.variant]) if ours else DupMAEConfig(cpu_attention=False)
    model = DupMAEModel.from_pretrained(args.model_name_or_path, config)
    module = model if ours else FullLogitsDupMAE(model)
    module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    collator = DupMAECollator.from_tokenizer(tokenizer, CollatorConfig(max_seq_length=args.seq_len))
    rows = make_blocks(tokenizer, args.batch_size * (args.steps + 1), args.seq_len - 2, seed=0)
    batches = [collator(rows[i:i + args.batch_size], torch.Generator().manual_seed(i))
               for i in range(0, len(rows), args.batch_size)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch: dict) -> float:
        optimizer.zero_grad(set_to_none=True)
        out = module(**{k: v.to(device) for k, v in batch.items()})
        loss = out.loss if ours else out
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
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"sec_per_step": seconds, "cpu_sec_per_step": cpu_seconds, "peak_bytes": peak, "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant; the minimum counts")
    parser.add_argument("--variant", choices=[*OURS, "baseline"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    runs: dict[str, list[dict]] = {variant: [] for variant in (*OURS, "baseline")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for _ in range(args.repeats):  # interleaved, so a busy spell on a shared machine hits both variants
        for variant in runs:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], env=env,
                                   capture_output=True, text=True)
            if child.returncode:
                raise SystemExit(f"{variant} run failed:\n{child.stderr[-3000:]}")
            runs[variant].append(json.loads(child.stdout.strip().splitlines()[-1]))
    results = {variant: {key: min(run[key] for run in variant_runs) for key in variant_runs[0]}
               for variant, variant_runs in runs.items()}
    base = results["baseline"]
    common = {"model": args.model_name_or_path or "all-MiniLM-L6-v2 (packaged)", "seq_len": args.seq_len,
              "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "device": args.device,
              "loss_baseline": round(base["loss"], 4)}
    memory = "peak_rss" if args.device == "cpu" else "peak_allocated"
    figures = (("time_per_step", "s", "sec_per_step", 1.0), ("cpu_time_per_step", "CPU s", "cpu_sec_per_step", 1.0),
               (memory, "MiB", "peak_bytes", 2**-20))
    for variant, checkpointing in OURS.items():
        ours = results[variant]
        for metric, unit, key, scale in figures:
            print(json.dumps({"bench": "pretrain_step", "metric": metric, "unit": unit,
                              "ours": round(ours[key] * scale, 3), "baseline": round(base[key] * scale, 3),
                              "ratio": round(ours[key] / base[key], 3), "better": "lower",
                              "gradient_checkpointing": checkpointing, "loss_ours": round(ours["loss"], 4), **common}))

if __name__ == "__main__":
    main()
