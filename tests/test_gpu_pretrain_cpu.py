"""benchmarks/gpu_pretrain.py on the CPU with a tiny config (the CUDA run happens on a lent GPU machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = "vocab_size=1000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"


@pytest.mark.slow
def test_cpu_run_prints_the_table():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["MASTER_PORT"] = "29537"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_pretrain.py"), "--device", "cpu", "--config_overrides", TINY,
         "--seq_len", "32", "--start_batch", "2", "--max_batch", "2", "--warmup_steps", "1", "--steps", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_metric = {line["metric"]: line for line in lines}
    setup = by_metric["setup"]
    assert setup["engine"] == "ZeRO-2 bf16" and setup["deepspeed"] and setup["layers"] == 2
    for metric in ("samples_per_s", "tokens_per_s", "mfu", "max_batch"):
        line = by_metric[metric]
        assert line["ours"] > 0 and line["baseline"] > 0, line
        assert line["ratio"] == pytest.approx(line["ours"] / line["baseline"], rel=0.02), line
    assert by_metric["max_batch"]["ours"] == 2
    assert by_metric["tokens_per_s"]["ours"] == pytest.approx(by_metric["samples_per_s"]["ours"] * 32, rel=0.02)


def test_flop_formula_matches_torch_flop_counter():
    """The documented FLOP count vs torch's counter on one training step of our model.

    The counter misses the in-place addmm_ that accumulates ∂L/∂W inside the fused cross-entropy
    (2·(m+t)·V·H FLOPs), so that term is added back; the rest must agree within 3 %.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertForMaskedLM

    sys.path.insert(0, str(ROOT))
    from benchmarks.full_logits import random_rows
    from benchmarks.gpu_pretrain import CLS, MASK, PAD, SEP, model_config, model_flops
    from pretrain.collator import CollatorConfig, DupMAECollator
    from pretrain.modeling import DupMAEConfig, DupMAEModel

    config = model_config(TINY)
    collator = DupMAECollator(CollatorConfig(max_seq_length=64), cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=MASK,
                              vocab_size=config.vocab_size)
    batch = collator(random_rows(4, 62, config.vocab_size, 0), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    # model FLOPs: without the CPU attention's recomputation in backward (on GPUs SDPA runs either way)
    model = DupMAEModel(BertForMaskedLM(config), DupMAEConfig(cpu_attention=False))
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    rows = int((batch["labels"] != -100).sum() + (batch["decoder_labels"] != -100).sum())
    counted = counter.get_total_flops() + 2 * rows * config.vocab_size * config.hidden_size
    assert counted == pytest.approx(model_flops(config, batch), rel=0.03)
