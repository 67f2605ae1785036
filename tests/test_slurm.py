"""slurm/: preprocessing and pre-training through `sbatch` on a real one-node SLURM cluster.

The module starts slurm/local_cluster.sh (munged, slurmctld, slurmd on localhost; it installs the Debian
packages when missing, as root) and stops it afterwards unless it was already running. preprocess.sbatch
writes tiny shards; on them a tiny model trains with 2 tasks on CPU through pretrain.sbatch, once straight
through and once preempted mid-run: USR1 to the batch shell, as SLURM sends before a time limit, must
checkpoint, requeue the job and resume it to exactly the same steps and losses. Skipped only when the
packages cannot be installed. evaluate.sbatch encodes a tiny BEIR corpus in 2 shards (one task each)
and merges them into the scores.

    pytest -q -m slurm tests/test_slurm.py
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
MAX_STEPS = 24  # two epochs; leaves room for the signal to land mid-run on a fast machine
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
WORDS = "retrieval encoder decoder masked dense sparse vector token passage query corpus duplex bag words".split()
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for sbatch/scontrol pointing at the local cluster; the cluster runs for this module."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DUPMAE_SLURM_DIR": os.environ.get("DUPMAE_SLURM_DIR", "/tmp/dupmae-slurm")}
    was_running = subprocess.run([str(CLUSTER), "status"], env=env, capture_output=True).returncode == 0
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        if not all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
            pytest.skip(f"the SLURM/munge Debian packages could not be installed: {started.stderr.strip()}")
        pytest.fail(f"local_cluster.sh start failed:\n{started.stdout}{started.stderr}")
    env["SLURM_CONF"] = str(Path(env["DUPMAE_SLURM_DIR"]) / "slurm.conf")
    # the sbatch scripts' defaults otherwise: ds_configs/zero2.json (bf16, gloo on CPU), logs beside the test data
    env.update(PYTHON=sys.executable, REPO=str(REPO), LOG_ROOT=str(state / "logs"), DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    yield env
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], env=env, check=True, capture_output=True)


def sbatch(env: dict, script: str, *args: str, flags: tuple[str, ...] = ()) -> str:
    """Submit slurm/<script> from the repository root; the job id."""
    submitted = subprocess.run(["sbatch", "--parsable", *flags, str(REPO / "slurm" / script), *args],
                               env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return submitted.stdout.strip().split(";")[0]


def job_info(env: dict, job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=env,
                           capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_for(env: dict, job_id: str, log_dir: Path, timeout: float = 300.0) -> dict[str, str]:
    """The job's final scontrol record; fails with its logs when it does not end in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info["JobState"] in FINAL_STATES:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s: {job_info(env, job_id)}\n{read_logs(log_dir)}")


def read_logs(log_dir: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted(log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def shard_dir(slurm_env, tmp_path_factory, minilm_path) -> Path:
    """Shards of 96 short documents written by `sbatch slurm/preprocess.sbatch` (Beam, one core)."""
    folder = tmp_path_factory.mktemp("preprocess")
    rng = random.Random(0)
    with open(folder / "docs.jsonl", "w") as out:
        for i in range(96):
            out.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + f" doc {i}"}) + "\n")
    env = {**slurm_env, "INPUT": str(folder / "docs.jsonl"), "OUTPUT_DIR": str(folder / "shards"),
           "TOKENIZER": minilm_path, "MAX_SEQ_LENGTH": "64"}
    job_id = sbatch(env, "preprocess.sbatch", "--num_shards", "2", "--direct_running_mode", "in_memory",
                    flags=("--cpus-per-task=1", f"--output={folder}/slurm-%j.out"))
    log_dir = Path(env["LOG_ROOT"]) / f"dupmae-preprocess-{job_id}"
    assert wait_for(env, job_id, log_dir)["JobState"] == "COMPLETED", read_logs(log_dir)
    manifest = json.loads((folder / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and sum(s["rows"] for s in manifest["shards"]) >= 96
    return folder / "shards"


class Job:
    """One `sbatch slurm/pretrain.sbatch`: 2 tasks on CPU training the tiny model into `output_dir`."""

    def __init__(self, env: dict, shard_dir: Path, model: str, output_dir: Path):
        self.env = {**env, "DATA_DIR": str(shard_dir), "MODEL": model, "OUTPUT_DIR": str(output_dir)}
        self.output_dir = output_dir
        self.id = sbatch(self.env, "pretrain.sbatch", "--config_overrides", TINY, "--max_seq_length", "64",
                         "--per_device_train_batch_size", "4", "--max_steps", str(MAX_STEPS), "--logging_steps", "1",
                         "--save_steps", "0", "--seed", "7", "--disable_tqdm",
                         flags=("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                                "--time=10", f"--output={output_dir.parent}/slurm-%j.out"))
        self.log_dir = Path(env["LOG_ROOT"]) / f"dupmae-pretrain-{self.id}"

    def info(self) -> dict[str, str]:
        return job_info(self.env, self.id)

    def wait(self) -> dict[str, str]:
        return wait_for(self.env, self.id, self.log_dir)

    def logs(self) -> str:
        return read_logs(self.log_dir)

    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steps(metrics: list[dict]) -> list[dict]:
    """Each logged step's numbers (losses, accuracies, lr, grad norm, epoch) without the throughput."""
    return [{k: v for k, v in m.items() if not k.endswith("_per_s")} for m in metrics]


@pytest.fixture(scope="module")
def straight_run(slurm_env, shard_dir, minilm_path, tmp_path_factory) -> Job:
    job = Job(slurm_env, shard_dir, minilm_path, tmp_path_factory.mktemp("straight") / "out")
    job.final = job.wait()
    return job


def test_sbatch_trains_to_completion_with_a_checkpoint_and_metrics(straight_run):
    job = straight_run
    assert job.final["JobState"] == "COMPLETED", job.logs()
    assert job.final["Restarts"] == "0"
    assert [m["step"] for m in job.metrics()] == list(range(1, MAX_STEPS + 1))
    latest = job.output_dir / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step-{MAX_STEPS:08d}"
    assert (job.output_dir / "checkpoints" / latest.read_text().strip()).is_dir()
    assert (job.output_dir / "export" / "config.json").is_file()
    # one srun task per rank, each with its own log; the trainer saw a world of 2 built from SLURM's variables
    assert sorted(p.name for p in job.log_dir.glob("rank-*.log")) == ["rank-0.log", "rank-1.log"]
    assert "96 blocks, 2 ranks" in (job.log_dir / "rank-0.log").read_text()


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_losses(straight_run, slurm_env, shard_dir, minilm_path,
                                                                   tmp_path_factory):
    job = Job(slurm_env, shard_dir, minilm_path, tmp_path_factory.mktemp("preempted") / "out")
    deadline = time.monotonic() + 300
    while not job.metrics():  # training has started: signal handlers are in place
        assert time.monotonic() < deadline and job.info()["JobState"] not in FINAL_STATES, job.logs()
        time.sleep(0.05)
    # what SLURM does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=slurm_env, check=True)
    final = job.wait()
    logs = job.logs()
    assert final["JobState"] == "COMPLETED", logs
    assert final["Restarts"] == "1", logs
    stopped = [int(n) for n in re.findall(r"preempted at step (\d+)", (job.log_dir / "rank-0.log").read_text())]
    assert len(stopped) == 1 and 1 <= stopped[0] < MAX_STEPS, logs
    assert "requeueing job" in logs
    assert job.output_dir.joinpath("checkpoints", f"step-{stopped[0]:08d}").is_dir()
    # exactly the planned steps, none lost or repeated, with the losses of the uninterrupted run
    resumed, straight = steps(job.metrics()), steps(straight_run.metrics())
    assert [m["step"] for m in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed == straight


def test_evaluate_encodes_one_shard_per_task_then_merges(slurm_env, minilm_path, tmp_path):
    beir = tmp_path / "tiny"
    (beir / "qrels").mkdir(parents=True)
    rng = random.Random(1)
    with open(beir / "corpus.jsonl", "w") as out:
        for i in range(30):
            out.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(rng.choices(WORDS, k=12))}) + "\n")
    with open(beir / "queries.jsonl", "w") as out:
        for i in range(5):
            out.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=4))}) + "\n")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{3 * i}\t1\n" for i in range(5)))
    env = {**slurm_env, "MODEL": minilm_path, "DATASETS": str(beir), "OUTPUT_DIR": str(tmp_path / "eval")}
    job_id = sbatch(env, "evaluate.sbatch", "--batch_size", "8",
                    flags=("--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"))
    log_dir = Path(env["LOG_ROOT"]) / f"dupmae-evaluate-{job_id}"
    assert wait_for(env, job_id, log_dir)["JobState"] == "COMPLETED", read_logs(log_dir)
    for task in (0, 1):  # task i encoded shard i
        assert f"tiny: shard {task}/2 encoded" in (log_dir / f"rank-{task}.log").read_text(), read_logs(log_dir)
    merge = (log_dir / "batch.log").read_text()
    # the merge read both shards and the queries the tasks encoded, and each task's hits instead of searching again
    assert merge.count("embedding cache hit") == 3 and merge.count("search hits cache hit") == 2, merge
    assert "searching shard" not in merge, merge
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 < results["tiny"]["nDCG@10"] <= 1
