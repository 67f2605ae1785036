"""What could make CPU/GPU encoding faster than plain fp32, and what each option costs in fidelity.

    python benchmarks/encode_options.py [--batch_size 32] [--seq_len 256] [--repeats 3] [--device cpu|cuda] [--smoke]

One forward pass of the packaged all-MiniLM-L6-v2 over a [batch, seq_len] batch of random tokens (a third of
the rows padded from 200 on), mean pooling + normalization as the SciFact evaluation uses. Baseline: the HF
model in fp32, eager PyTorch (SDPA attention) -- what both `evaluation` and the `beir` package run. Each
option prints one JSON line: texts/s ratio against the baseline (same run, best of --repeats) and the
lowest cosine between an option's embedding and the fp32 one over the batch (1.0 = same ranking input).
Options: bf16 autocast (fast only with native bf16: AVX512-BF16/AMX or a GPU), torch.compile (--compile_backend,
inductor by default; its compile time is reported, not timed), int8 dynamic quantization of the Linear layers
(CPU only). --smoke compiles with the `eager` backend: the graph capture without inductor's code generation.
The first line reports the fp32 baseline's share of time in matrix multiplications: the ceiling for any
fp32 option that only removes the other work is 1 / (1 - that share).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import smoke  # noqa: E402
from common.defaults import default_model_path  # noqa: E402

BENCH = "encode_options"


def embed(model, input_ids, mask) -> torch.Tensor:
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state.float()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (lazy init, autotuning)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_share(model, input_ids, mask) -> float:
    """Share of the fp32 forward's self time spent in addmm/mm/bmm/linear kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=input_ids, attention_mask=mask)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::addmm", "aten::mm", "aten::bmm"))
    return gemm / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend")
    args = smoke.parse_args(parser, batch_size=2, seq_len=16, repeats=1, compile_backend="eager")
    from transformers import AutoModel

    device = torch.device(args.device)
    model = AutoModel.from_pretrained(default_model_path()).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=generator).to(device)
    mask = torch.ones_like(input_ids)
    mask[::3, min(200, args.seq_len - 1):] = 0
    common = {"batch_size": args.batch_size, "seq_len": args.seq_len, "device": args.device,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "compile_backend": args.compile_backend, "smoke": args.smoke}
    with torch.inference_mode():
        reference = embed(model, input_ids, mask)
        base_s = best_seconds(lambda: embed(model, input_ids, mask), args.repeats)
        if device.type == "cpu":
            share = matmul_share(model, input_ids, mask)
            print(json.dumps({"bench": BENCH, "metric": "fp32_matmul_time_share", "unit": "fraction",
                              "value": round(share, 3), "fp32_ceiling_ratio": round(1 / (1 - share), 3), **common}))

        def bf16():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return embed(model, input_ids, mask)

        options = {"bf16_autocast": (bf16, 0.0)}
        start = time.perf_counter()
        compiled = torch.compile(model, backend=args.compile_backend)
        embed(compiled, input_ids, mask)
        options["torch_compile"] = (lambda: embed(compiled, input_ids, mask), time.perf_counter() - start)
        if device.type == "cpu":
            int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
            options["int8_dynamic"] = (lambda: embed(int8, input_ids, mask), 0.0)
        for name, (fn, setup_s) in options.items():
            seconds = best_seconds(fn, args.repeats)
            cosine = (fn() * reference).sum(-1).min().item()
            print(json.dumps({"bench": BENCH, "metric": f"{name}_texts_per_s", "unit": "texts/s",
                              "ours": round(args.batch_size / seconds, 2),
                              "baseline": round(args.batch_size / base_s, 2), "ratio": round(base_s / seconds, 3),
                              "better": "higher", "min_cosine_to_fp32": round(cosine, 5),
                              "setup_s": round(setup_s, 1), **common}))


if __name__ == "__main__":
    main()
