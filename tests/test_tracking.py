"""--report_to (common/tracking.py) and the run's provenance (common/provenance.py), offline and real.

W&B runs in offline mode and is read back from its own run files (the LevelDB-style log of protobuf records that
`wandb sync` uploads); MLflow writes a local file store (mlruns/) and is read back through its own client. A run
stopped at step 2 and resumed must continue the same tracker runs, and every tracker must hold the very numbers of
metrics.jsonl at their steps. A tracker that is missing or cannot start is one error line before any step.
The runs use the demo's DeepSpeed JSONs and pre-train a model without an MLM head, as the demo does: their logs
must hold no WARNING line (issue 38 item 4; tests/test_quiet_log.py checks the demo's Beam stage).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from common.tracking import Tracking, TrackerError, resolve_report_to
from test_finetune import beir_dir, tiny_model, tokenizer  # noqa: F401 (fixtures)
from test_pretrain_data import make_texts, write_shards
from test_quiet_log import WARNING

REPO = Path(__file__).resolve().parents[1]
#: MLflow 3's file store needs an opt-in; its usage telemetry would reach out to the network.
OFFLINE_MLFLOW = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@pytest.fixture(autouse=True)
def offline_mlflow(monkeypatch):
    """This process's own MLflow clients (reading the runs back) stay offline too."""
    for key, value in OFFLINE_MLFLOW.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def headless_model(tmp_path_factory, minilm_path) -> Path:
    """A tiny BERT without an MLM head (the packaged MiniLM's documented case) and the packaged tokenizer."""
    from transformers import BertConfig, BertModel

    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(minilm_path)
    out = tmp_path_factory.mktemp("headless")
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(tokenizer), max_position_embeddings=64)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_all(commands: list[list[str]], env: dict[str, str]) -> str:
    """Run each command to completion (exit 0 asserted); their logs together."""
    log = ""
    for command in commands:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        log += done.stdout + done.stderr
    return log


def _env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "MLFLOW_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            **OFFLINE_MLFLOW}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _scalars(record: dict) -> dict:
    return {key: value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: W&B's LevelDB-style log (a 7-byte header, then 32 KiB blocks of
    chunks, each a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb_run(folder: Path) -> dict:
    """{"id", "history": [{name: value}], "config": {key: value}} of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    run = {"id": None, "history": [], "config": {}}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"].append({key: value for key, value in items.items() if not key.startswith("_")})
    return run


def check_mlflow(tmp_path: Path, out: Path, records: list[dict], starts: list[int]) -> None:
    """One MLflow run holding every metric of `records` at its step, the options as params and one provenance
    artifact per start."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("dupmae")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    for key in _scalars(records[0]):
        name = key.replace("@", "_")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == [(r["step"], pytest.approx(float(r[key]))) for r in records if key in r], key
    provenance = json.loads((out / "provenance" / "step-0.json").read_text())
    options = {f"{group}.{key}": str(value) for group, values in provenance["config"].items()
               for key, value in values.items()}  # pre-training's option groups
    assert run.data.params == options
    artifacts = sorted(f.path for f in client.list_artifacts(run.info.run_id, "provenance"))
    assert artifacts == [f"provenance/step-{step}.json" for step in starts]


def check_wandb(out: Path, records: list[dict], starts: list[int]) -> None:
    """One offline run folder per start, all of the same run id, whose histories together are `records` (from the
    resumed step on for the later start) and whose config is that start's provenance."""
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == len(starts)
    runs = [read_wandb_run(folder) for folder in folders]
    assert len({run["id"] for run in runs}) == 1 and runs[0]["id"]
    logged = [row for run in runs for row in run["history"]]
    assert logged == [{"step": r["step"], **_scalars(r)} for r in records]
    for run, step in zip(runs, starts):
        provenance = json.loads((out / "provenance" / f"step-{step}.json").read_text())
        assert {key: run["config"][key] for key in provenance} == json.loads(json.dumps(provenance))


def check_provenance(out: Path, step: int, data: dict[str, Path]) -> dict:
    provenance = json.loads((out / "provenance" / f"step-{step}.json").read_text())
    commit = provenance["git"]["commit"]  # a commit of this checkout (HEAD itself may have moved on since)
    assert subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"]).returncode == 0
    assert len(commit) == 40 and isinstance(provenance["git"]["dirty"], bool)
    import deepspeed
    import torch
    import transformers

    packages = provenance["packages"]
    assert (packages["torch"], packages["deepspeed"], packages["transformers"]) == (
        torch.__version__, deepspeed.__version__, transformers.__version__)
    hardware = provenance["hardware"]
    assert hardware["world_size"] == 1 and hardware["cpu_model"] and hardware["gpu_count"] == 0
    assert provenance["data"] == {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in data.items()}
    return provenance


@pytest.mark.slow
def test_pretraining_reports_to_wandb_and_mlflow_and_a_resume_continues_them(tmp_path, minilm_path,
                                                                            headless_model):
    from common.tokenizer import load_tokenizer

    shards = write_shards(tmp_path / "shards", load_tokenizer(minilm_path), make_texts(24), max_seq_length=64)
    out = tmp_path / "run"
    command = [sys.executable, "pretrain/main.py", "--deepspeed", "ds_configs/zero2_cpu.json", "--bf16", "false",
               "--data_dir", str(shards), "--output_dir", str(out), "--model_name_or_path", str(headless_model),
               "--max_seq_length", "64", "--per_device_train_batch_size", "2", "--max_steps", "4",
               "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "--report_to", "wandb", "mlflow"]
    log = run_all([command + ["--stop_at_step", "2"], command + ["--resume", "auto"]], _env(tmp_path))
    assert [line for line in log.splitlines() if WARNING.search(line)] == []
    assert re.search(r" INFO \[pretrain.modeling\] .*has no MLM head: initialized \d+ head tensors", log)
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    check_wandb(out, records, [0, 2])
    check_mlflow(tmp_path, out, records, [0, 2])
    provenance = check_provenance(out, 0, {"manifest.json": shards / "manifest.json"})
    assert provenance["config"]["training"]["report_to"] == ["wandb", "mlflow"]  # every option, defaults too
    assert provenance["config"]["training"]["warmup_ratio"] == 0.1 and provenance["config"]["training"]["resume"] is None
    assert provenance["deepspeed"]["train_batch_size"] == 2 and provenance["deepspeed"]["zero_optimization"]
    resumed = check_provenance(out, 2, {"manifest.json": shards / "manifest.json"})
    assert resumed["config"]["training"]["resume"] == "auto"
    assert not (out / "tensorboard").exists()  # not asked for


@pytest.mark.slow
def test_finetuning_reports_to_wandb_and_mlflow_and_a_resume_continues_them(tmp_path, tiny_model, beir_dir):
    out = tmp_path / "ft"
    command = [sys.executable, "finetune/main.py", "--deepspeed", "ds_configs/finetune_cpu.json",
               "--model_name_or_path", str(tiny_model), "--data_dir", str(beir_dir), "--output_dir", str(out),
               "--train_group_size", "2", "--per_device_train_batch_size", "4", "--save_steps", "2",
               "--logging_steps", "1", "--passage_max_length", "24", "--report_to", "all", "--run_name", "ft-run"]
    log = run_all([command + ["--max_steps", "2"],
                   command + ["--max_steps", "3", "--resume_from_checkpoint", "auto"]], _env(tmp_path))
    assert [line for line in log.splitlines() if WARNING.search(line)] == []  # DeepSpeed's scheduler note gone
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    check_wandb(out, records, [0, 2])
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dupmae").experiment_id])
    assert run.info.run_name == "ft-run" and run.data.params["report_to"] == "['tensorboard', 'wandb', 'mlflow']"
    for key in _scalars(records[0]):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], pytest.approx(float(r[key]))) for r in records], key
    data = {name: beir_dir / name for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv")}
    assert check_provenance(out, 2, data)["config"]["max_steps"] == 3
    assert list((out / "runs").glob("events.out.tfevents.*"))  # "all" includes TensorBoard


def test_report_to_values_follow_hf():
    assert resolve_report_to(["none"]) == [] and resolve_report_to([]) == []
    assert resolve_report_to(["all"]) == ["tensorboard", "wandb", "mlflow"]  # every one installed (dev extra)
    assert resolve_report_to("wandb") == ["wandb"]  # a YAML config's single string
    assert resolve_report_to(["mlflow", "tensorboard"]) == ["tensorboard", "mlflow"]
    with pytest.raises(TrackerError, match="unknown comet; choose from tensorboard, wandb, mlflow"):
        resolve_report_to(["comet"])


def test_a_missing_tracker_is_one_error_line_before_anything(tmp_path, monkeypatch, caplog):
    import finetune.main
    import pretrain.main

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importlib finds no spec
    assert resolve_report_to(["all"]) == ["tensorboard", "mlflow"]
    monkeypatch.setattr(pretrain.main, "setup_logging", lambda rank: None)  # keep pytest's log capture
    monkeypatch.setattr("common.logging_setup.setup_logging", lambda rank=None: None)
    out = tmp_path / "out"
    expected = "--report_to wandb: not installed; pip install -e '.[wandb]' (or pip install wandb)"
    with caplog.at_level(logging.INFO):
        assert pretrain.main.main(["--data_dir", str(tmp_path), "--output_dir", str(out), "--report_to", "wandb",
                                   "mlflow"]) == 2
    assert [r.getMessage() for r in caplog.records] == [expected]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert finetune.main.main(["--data_dir", str(tmp_path), "--output_dir", str(out), "--deepspeed", "x.json",
                                   "--report_to", "wandb"]) == 2
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert not out.exists()


def test_a_tracker_that_cannot_start_is_one_error_and_one_that_fails_later_is_dropped(tmp_path, monkeypatch,
                                                                                      caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nowhere://tracking")
    with pytest.raises(TrackerError, match=r"^--report_to mlflow: could not start: \w+: .*nowhere") as caught:
        Tracking.start(["tensorboard", "mlflow"], rank=0, output_dir=tmp_path, tensorboard_dir=tmp_path / "tb",
                       run_name=None, resume_step=0, ids=None, provenance={"config": {}})
    assert "\n" not in str(caught.value)

    class Broken:
        run_id = "x"

        def log(self, step, scalars):
            raise ConnectionError("server gone\nmore")

    class Kept:
        run_id = None
        logged = []

        def log(self, step, scalars):
            self.logged.append((step, scalars))

    tracking = Tracking({"wandb": Broken(), "tensorboard": Kept()})
    with caplog.at_level(logging.WARNING):
        for step in (1, 2):
            tracking.log({"step": step, "loss": 1.5, "grad_norm": None, "eval/mean/nDCG@10": 0.25})
    assert [r.getMessage() for r in caplog.records] == [
        "--report_to wandb: logging step 1 failed (ConnectionError: server gone); no more wandb reports in this run"]
    assert Kept.logged == [(1, {"loss": 1.5, "eval/mean/nDCG@10": 0.25}), (2, {"loss": 1.5, "eval/mean/nDCG@10": 0.25})]
    assert tracking.ids() == {}


def test_a_resume_reuses_the_data_hashes_of_files_unchanged_since(tmp_path, monkeypatch):
    """A start hashes every data file (a corpus of gigabytes, while the other ranks wait); a later start of the
    same run takes the hash of a file whose path, size, mtime, inode and ctime are unchanged, and hashes again one
    that changed, even with its size and mtime kept."""
    from common import provenance

    corpus, queries = tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl"
    corpus.write_text('{"_id": "d1"}\n')
    queries.write_text('{"_id": "q1"}\n')
    files = {"corpus.jsonl": corpus, "queries.jsonl": queries, "absent.tsv": tmp_path / "absent.tsv"}
    hashed = []
    real = provenance.file_sha256
    monkeypatch.setattr(provenance, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    out = tmp_path / "run"
    first = provenance.record(0, out, 0, config={}, deepspeed=None, data_files=files, world_size=1)
    assert sorted(hashed) == ["corpus.jsonl", "queries.jsonl"] and first["data"]["absent.tsv"] is None
    hashed.clear()
    written = queries.stat().st_mtime_ns
    queries.write_text('{"_id": "q2"}\n')  # same size, and the mtime set back as `cp -p` does: a new ctime only
    os.utime(queries, ns=(written, written))
    second = provenance.record(0, out, 4, config={}, deepspeed=None, data_files=files, world_size=1)
    assert hashed == ["queries.jsonl"]  # the corpus's hash came from step-0.json
    assert second["data"] == {name: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
                              for name, path in files.items()}
    assert json.loads((out / "provenance" / "step-4.json").read_text())["data"] == second["data"]
    assert provenance.record(1, out, 4, config={}, deepspeed=None, data_files=files, world_size=2) == {}


def test_git_state_names_a_commit_only_for_the_checkout_that_holds_the_code(tmp_path):
    """Code installed into a virtual environment that lies inside some other checkout is not that checkout's code:
    git run from site-packages would find the enclosing repository and record its commit."""
    from common.provenance import git_state

    inside = tmp_path / "repo" / "venv" / "site-packages"
    inside.mkdir(parents=True)
    git = ["git", "-C", str(tmp_path / "repo")]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "repo" / "a.txt").write_text("a\n")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(tmp_path / "repo") == {"commit": head, "dirty": False}
    assert git_state(inside) == {"commit": None, "dirty": None}
    assert git_state(tmp_path) == {"commit": None, "dirty": None}  # no checkout at all
