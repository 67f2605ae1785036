"""A quiet log (issue 38 item 4): a demo-like run prints no WARNING line a user cannot act on.

`make demo`'s stages at toy size, with the demo's settings: here its Beam stage (the local multi-process workers);
tests/test_tracking.py checks the logs of its pre-training (ds_configs/zero2_cpu.json, a model without an MLM head,
the packaged MiniLM's documented case) and fine-tuning (ds_configs/finetune_cpu.json) runs the same way. Before
the filters of common/quiet_log.py these stages printed 9 such lines: Beam's GCP notice 3x, "Discarding
unparseable args" and "No semi_persistent_directory found" 2x each, DeepSpeed's scheduler note, the missing head.
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
#: a warning in our log format, Python's warnings, or transformers' own handler ("[transformers] ...", WARNING and
#: up only; with CI=true transformers propagates to our format instead, which is how CI first caught its load report)
WARNING = re.compile(r"WARNING|Warning:|^\[transformers\] ")


@pytest.mark.slow
def test_the_demos_beam_stage_prints_no_warning_line(tmp_path):
    words = "retrieval encoder decoder masked sentence vector sparse dense query passage corpus token".split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": " ".join(
        words[(i + j) % len(words)] for j in range(9))}) + "\n" for i in range(24)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "preprocessing.pretrain_data", "--input", str(corpus),
                           "--text_fields", "title", "text", "--output_dir", str(tmp_path / "shards"),
                           "--max_seq_length", "64", "--direct_num_workers", "2"],  # the demo's: 2 worker processes
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert [line for line in log.splitlines() if WARNING.search(line)] == []
    assert log.count("Python sdk harness starting") == 2  # both worker processes ran, through beam_worker
    assert (tmp_path / "shards" / "manifest.json").is_file()


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
