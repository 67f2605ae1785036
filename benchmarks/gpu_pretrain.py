"""DupMAE pre-training throughput, MFU and memory on one accelerator: ours vs the full-logits baseline.

    python benchmarks/gpu_pretrain.py --device cuda                    # BERT-base, seq 512, bf16 ZeRO-2
    python benchmarks/gpu_pretrain.py --device cpu --config_overrides \
        "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128" --seq_len 64 --max_batch 4
    python benchmarks/gpu_pretrain.py --smoke                         # CPU, SMOKE_MODEL, seq 32, batch 2, 1 step

One process, one device. Checks that torch sees the device and that DeepSpeed initializes ZeRO-2 with
bf16 (single-process env RANK=0 WORLD_SIZE=1 MASTER_ADDR/PORT set when missing). The model is built from
bert-base-uncased's shape (12 layers, 768 hidden, 12 heads, 3072 intermediate, vocab 30522) with random
weights, no download; --config_overrides edits it. For each variant the batch doubles from --start_batch
until out-of-memory, --max_batch or the variant's half of --time_budget_s; every batch that fits is timed
(--warmup_steps, then --steps) and the largest is reported, plus both variants' peak memory at the
largest batch the baseline fits (the "same batch" comparison).

Model FLOPs per sample (one formula for both variants: the baseline's extra logits are waste, not work),
with H hidden, I intermediate, n layers, L padded length, V vocabulary, counted as multiply-adds x2:
    forward  = 2·L·(n+1)·(4H² + 2HI)        encoder layers + the decoder layer (projections, FFN)
             + 2·(n+1)·2·L²·H               attention scores and context
             + 2·(m + t)·(H² + V·H)         MLM head at the m masked and t decoder-target positions
             + 2·k·(H² + V·H)               OT max-pool at the k kept tokens
    training = 3·(all terms but the last) + the last   (backward ≈ 2x forward; the max-pool's backward is
                                                        O(V·H) per sample, not counted)
m, t, k are counted from each batch. MFU = FLOPs / s / (--peak_tflops · 1e12); the default 989 is an
H100 SXM's dense bf16 peak. Prints one JSON line per figure (setup first).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import smoke  # noqa: E402
from benchmarks.full_logits import FullLogitsDupMAE, random_rows  # noqa: E402
from pretrain.collator import CollatorConfig, DupMAECollator  # noqa: E402
from pretrain.modeling import DupMAEConfig, DupMAEModel  # noqa: E402

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
CLS, SEP, PAD, MASK = 101, 102, 0, 103  # bert-base-uncased ids
#: --smoke's model: 2 tiny layers over a 1,000-word vocabulary.
SMOKE_MODEL = "vocab_size=1000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config_overrides", default="", help='e.g. "hidden_size=64,num_hidden_layers=2"')
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per block including [CLS]/[SEP]")
    parser.add_argument("--start_batch", type=int, default=8)
    parser.add_argument("--max_batch", type=int, default=1024)
    parser.add_argument("--warmup_steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--time_budget_s", type=float, default=420, help="for the batch search, both variants")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="device peak (H100 SXM dense bf16: 989)")
    parser.add_argument("--bow_weight", type=float, default=1.0)
    return smoke.parse_args(parser, argv, device="cpu", config_overrides=SMOKE_MODEL, seq_len=32, start_batch=2,
                            max_batch=2, warmup_steps=1, steps=1)


def model_config(overrides: str):
    from transformers import BertConfig

    config = BertConfig(**BERT_BASE)
    if overrides:
        config.update_from_string(overrides)
    return config


def init_deepspeed(device: str) -> str:
    """Single-process distributed env + DeepSpeed's process group; returns DeepSpeed's version."""
    try:
        import deepspeed
    except ImportError as exc:
        raise SystemExit(f"cannot import deepspeed ({exc}): install it (or its wheel) on this machine") from None

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)
    if device == "cpu":  # skip compiling DeepSpeed's shared-memory CPU all-reduce op: gloo suffices for one rank
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), auto_mpi_discovery=False)
    return deepspeed.__version__


def build_engine(variant: str, hf_config, batch_size: int, bow_weight: float):
    import deepspeed
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    model = DupMAEModel(BertForMaskedLM(hf_config), DupMAEConfig(bow_weight=bow_weight))
    module = model if variant == "ours" else FullLogitsDupMAE(model)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01)
    config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def model_flops(hf_config, batch: dict) -> float:
    """Training FLOPs of one batch by the formula in the module docstring."""
    h, i, n, v = hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_hidden_layers, hf_config.vocab_size
    b, length = batch["input_ids"].shape
    masked = int((batch["labels"] != -100).sum())
    targets = batch["decoder_labels"] != -100
    kept = int((targets & (batch["labels"] == -100)).sum())
    dense = b * (2 * length * (n + 1) * (4 * h * h + 2 * h * i) + 2 * (n + 1) * 2 * length * length * h)
    heads = 2 * (masked + int(targets.sum())) * (h * h + v * h)
    return 3.0 * (dense + heads) + 2.0 * kept * (h * h + v * h)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_batch(variant: str, hf_config, batch_size: int, args, collator, device: torch.device) -> dict:
    """Warm-up + timed steps at one batch size -> {samples_per_s, tokens_per_s, mfu, peak_mib}."""
    engine = None
    try:
        engine = build_engine(variant, hf_config, batch_size, args.bow_weight)
        rows = random_rows(batch_size * (args.warmup_steps + args.steps), args.seq_len - 2, hf_config.vocab_size, 0)
        batches = [collator(rows[s:s + batch_size], torch.Generator().manual_seed(s))
                   for s in range(0, len(rows), batch_size)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        flops = tokens = 0.0
        for step, batch in enumerate(batches):
            if step == args.warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            out = engine(**{k: t.to(device) for k, t in batch.items()})
            engine.backward(out.loss if variant == "ours" else out)
            engine.step()
            if step >= args.warmup_steps:
                flops += model_flops(hf_config, batch)
                tokens += float(batch["attention_mask"].sum())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        return {"samples_per_s": batch_size * args.steps / seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (args.peak_tflops * 1e12), "peak_mib": peak}
    finally:
        if engine is not None:
            engine.destroy()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search(variant: str, hf_config, args, collator, device: torch.device, deadline: float) -> dict[int, dict]:
    """Double the batch from --start_batch until OOM, --max_batch or the deadline: {batch: result}."""
    results: dict[int, dict] = {}
    batch_size = args.start_batch
    while batch_size <= args.max_batch and time.monotonic() < deadline:
        try:
            results[batch_size] = run_batch(variant, hf_config, batch_size, args, collator, device)
        except Exception as exc:  # OOM surfaces as different exception types inside DeepSpeed
            if not is_oom(exc):
                raise
            print(json.dumps({"bench": "gpu_pretrain", "metric": "oom", "variant": variant, "batch": batch_size}),
                  flush=True)
            break
        print(json.dumps({"bench": "gpu_pretrain", "metric": "trial", "variant": variant, "batch": batch_size,
                          **{k: None if v is None else float(f"{v:.4g}") for k, v in results[batch_size].items()}}),
              flush=True)
        batch_size *= 2
    return results


def figure(metric: str, unit: str, ours: float, baseline: float, better: str, **extra) -> str:
    """One JSON line; values to 4 significant digits, the ratio from the unrounded values."""
    return json.dumps({"bench": "gpu_pretrain", "metric": metric, "unit": unit, "ours": float(f"{ours:.4g}"),
                       "baseline": float(f"{baseline:.4g}"), "ratio": round(ours / baseline, 4), "better": better,
                       **extra})


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    ds_version = init_deepspeed(args.device)
    hf_config = model_config(args.config_overrides)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"bench": "gpu_pretrain", "metric": "setup", "device": name, "torch": torch.__version__,
                      "deepspeed": ds_version, "engine": "ZeRO-2 bf16", "seq_len": args.seq_len,
                      "layers": hf_config.num_hidden_layers, "hidden": hf_config.hidden_size,
                      "vocab": hf_config.vocab_size, "peak_tflops": args.peak_tflops,
                      "smoke": args.smoke}), flush=True)
    collator = DupMAECollator(CollatorConfig(max_seq_length=args.seq_len), cls_id=CLS, sep_id=SEP, pad_id=PAD,
                              mask_id=MASK, vocab_size=hf_config.vocab_size)
    half = args.time_budget_s / 2
    found = {"ours": search("ours", hf_config, args, collator, device, started + half)}
    found["baseline"] = search("baseline", hf_config, args, collator, device, started + 2 * half)
    if not found["ours"] or not found["baseline"]:
        raise SystemExit(f"no batch size fit for {[v for v, r in found.items() if not r]} "
                         f"(start_batch {args.start_batch})")
    best = {variant: results[max(results)] for variant, results in found.items()}
    largest = {variant: max(results) for variant, results in found.items()}
    extra = {"device": name, "seq_len": args.seq_len, "batch_ours": largest["ours"],
             "batch_baseline": largest["baseline"], "smoke": args.smoke}
    for metric, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s"), ("mfu", "fraction")):
        print(figure(metric, unit, best["ours"][metric], best["baseline"][metric], "higher", **extra,
                     **({"peak_tflops": args.peak_tflops} if metric == "mfu" else {})))
    print(figure("max_batch", "samples", largest["ours"], largest["baseline"], "higher", **extra))
    if device.type == "cuda":
        print(figure("peak_memory_at_max_batch", "MiB", best["ours"]["peak_mib"], best["baseline"]["peak_mib"],
                     "lower", **extra))
        same = largest["baseline"]
        if same in found["ours"]:
            print(figure("peak_memory_same_batch", "MiB", found["ours"][same]["peak_mib"],
                         found["baseline"][same]["peak_mib"], "lower", device=name, seq_len=args.seq_len, batch=same,
                         smoke=args.smoke))
    print(json.dumps({"bench": "gpu_pretrain", "metric": "wall_time", "unit": "s",
                      "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
