"""A quiet log (issue 38 item 4): the stages of a demo-like run print no WARNING line a user cannot act on.

The run is `make demo`'s stages at toy size, with the demo's own settings: Beam preprocessing with the local
multi-process workers, pre-training on ds_configs/zero2_cpu.json from a model without an MLM head (the packaged
MiniLM's documented case, here a tiny BERT without one), fine-tuning on ds_configs/finetune_cpu.json. Before the
filters of common/quiet_log.py it printed 9 such lines (Beam's GCP notice 3x, "Discarding unparseable args" and
"No semi_persistent_directory found" 2x each, DeepSpeed's scheduler note, the missing head).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.quiet_log import silence_known_notices

REPO = Path(__file__).resolve().parents[1]
WARNING = re.compile(r"WARNING|Warning:")


def _run(*argv: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    return log


@pytest.mark.slow
def test_a_demo_like_run_prints_no_warning_line(tmp_path, minilm_path):
    from transformers import BertConfig, BertModel

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    model = tmp_path / "headless"
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=64)
    BertModel(config).save_pretrained(model)  # no MLM head, as the packaged MiniLM
    tokenizer.save_pretrained(model)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    words = "retrieval encoder decoder masked sentence vector sparse dense query passage corpus token".split()
    docs = [{"_id": f"d{i}", "title": f"doc {i}", "text": " ".join(words[(i + j) % len(words)] for j in range(9))}
            for i in range(24)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": words[i % len(words)]}) + "\n"
                                                for i in range(8)))
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n"
                                                                                       for i in range(8)))
    log = _run("-m", "preprocessing.pretrain_data", "--input", str(beir / "corpus.jsonl"), "--text_fields", "title",
               "text", "--output_dir", str(tmp_path / "shards"), "--max_seq_length", "64",
               "--direct_num_workers", "2")
    log += _run("pretrain/main.py", "--deepspeed", "ds_configs/zero2_cpu.json", "--data_dir", str(tmp_path / "shards"),
                "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "pretrain"), "--max_seq_length",
                "64", "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                "--save_steps", "0", "--disable_tqdm")
    log += _run("finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json", "--model_name_or_path",
                str(model), "--data_dir", str(beir), "--output_dir", str(tmp_path / "finetune"), "--train_group_size",
                "2", "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                "--passage_max_length", "24")
    assert [line for line in log.splitlines() if WARNING.search(line)] == []
    assert re.search(r" INFO \[pretrain.modeling\] .*headless has no MLM head: initialized \d+ head tensors", log)
    assert "worker" in log and "finished training at step 2" in log  # the runs happened, workers included


def test_only_the_known_notices_are_dropped():
    silence_known_notices()
    silence_known_notices()  # once per logger, however often it runs
    assert sum(1 for f in logging.getLogger("DeepSpeed").filters if type(f).__name__ == "_DropNotice") == 1
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("DeepSpeed", "apache_beam.options.pipeline_options", "other")]
    for logger in loggers:  # DeepSpeed's own logger does not propagate: collect at each
        logger.addHandler(handler)
    try:
        loggers[0].warning("Attempting to get learning rate from scheduler before it has started")
        loggers[0].warning("Attempting something a user should see")
        loggers[1].warning("Discarding unparseable args: %s", ["--x"])
        loggers[1].warning("another Beam warning")
        loggers[2].warning("Discarding unparseable args: but from elsewhere")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert said == ["Attempting something a user should see", "another Beam warning",
                    "Discarding unparseable args: but from elsewhere"]
