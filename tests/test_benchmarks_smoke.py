"""Every benchmark script runs in its smoke mode (`--smoke`: tiny config, CPU, no ../shared data) and prints its
JSON lines in the standard format, so a broken benchmark cannot land (issue 25: finetune_scifact.py had stopped
running). A script is any benchmarks/*.py with a `__main__` block; one without --smoke fails here."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
#: Scripts whose smoke mode another test runs (their owners' tests).
SMOKE_TESTED_ELSEWHERE = {"adaptation.py", "ablation.py"}
#: Scripts that need the official code itself (skipped without it): official_parity.py compares against nothing else.
NEEDS_OFFICIAL = {"official_parity.py", "official_finetune_parity.py"}
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text() and p.name not in SMOKE_TESTED_ELSEWHERE)
#: Extra flags: scripts that write a run folder get the test's.
OUTPUT_DIR = {"distill.py", "evaluate.py", "finetune_scifact.py", "search_scale.py"}
#: The official RetroMAE `src` folder and a Python with the transformers it needs (4.x), for pretrain_step.py's
#: `official` baseline; that case is skipped without them (the README's "Pre-training step against the official code").
OFFICIAL = ("RETROMAE_SRC", "RETROMAE_PYTHON")
#: Lines that report a setting or a state, not a comparison: "bench" and "metric" only.
INFO_METRICS = {"setup", "trial", "oom", "wall_time", "fp32_matmul_time_share", "skipped"}
#: Benches whose lines may set "better" to null: the paper objective's terms beside the official code's, and
#: collator statistics beside the official collator's (official_parity.py).
SIDE_BY_SIDE = {"official_parity", "official_collator_stats"}
FIGURE_KEYS = {"bench", "metric", "unit", "ours", "baseline", "ratio", "better"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cases():
    official = ["--official_src", os.environ.get(OFFICIAL[0], ""), "--official_python", os.environ.get(OFFICIAL[1], "")]
    for name in SCRIPTS:
        if name not in NEEDS_OFFICIAL:
            yield pytest.param(name, [], id=name)
    yield pytest.param("pretrain_step.py", official, id="pretrain_step.py-official")
    for name in sorted(NEEDS_OFFICIAL):
        yield pytest.param(name, official, id=f"{name}-official")


def test_the_scripts_are_found():
    assert {"collator.py", "finetune_scifact.py", "gpu_pretrain.py", "pretrain_step.py"} | NEEDS_OFFICIAL <= set(SCRIPTS)
    assert "full_logits.py" not in SCRIPTS and "smoke.py" not in SCRIPTS  # modules, not scripts


@pytest.mark.slow
@pytest.mark.parametrize("script,flags", _cases())
def test_benchmark_smoke_mode_prints_standard_json_lines(script, flags, tmp_path):
    if "--official_src" in flags:
        src, python = (os.environ.get(name, "") for name in OFFICIAL)
        if not (Path(src).is_dir() and Path(python).is_file()):
            pytest.skip(f"set {OFFICIAL[0]} (RetroMAE's src folder) and {OFFICIAL[1]} (a Python with transformers "
                        "4.x) to smoke-run the official baseline")
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO))
    if script in OUTPUT_DIR:
        flags = [*flags, "--output_dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke", *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the JSON lines; DeepSpeed logs to stdout too ("[2026-...] [INFO] ..."), so lines not starting with { are not ours
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    figures = [line for line in lines if line.get("metric") not in INFO_METRICS]
    assert figures, done.stdout
    for line in lines:
        assert isinstance(line, dict) and line.get("bench") and line.get("metric"), line
    for line in figures:
        assert FIGURE_KEYS <= set(line), (FIGURE_KEYS - set(line), line)
        assert _is_number(line["ours"]) and _is_number(line["baseline"]), line
        assert line.get("smoke") is True, line  # a smoke figure cannot pass for a result
        if line["better"] is None:  # two measurements of one quantity side by side, neither better
            assert line["bench"] in SIDE_BY_SIDE and line["unit"], line
            continue
        # a difference of exactly 0 (official_finetune_parity.py: the same operations in the same order) has ratio 0
        assert _is_number(line["ratio"]) and (line["ratio"] > 0 or line["ours"] == 0 == line["ratio"]), line
        assert line["better"] in ("higher", "lower") and line["unit"], line
