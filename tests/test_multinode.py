"""Every stage across real nodes: a 3-node SLURM cluster on this machine (slurm/local_cluster.sh start --nodes 3).

Each node is a network namespace with its own hostname, address (10.213.S.x on a private bridge, no route out) and
mount namespace; the filesystem is shared, as on a cluster. The jobs run 2 nodes x 1 task on CPU, gloo over the
virtual link, and are compared with the same job as 2 tasks on one node. The module starts its own cluster in
/tmp/dupmae-slurm-multinode on ports 6827/6828, beside the 1-node one of tests/test_slurm.py, and stops it at the end.
Needs root (namespaces, the daemons); skipped when the Debian packages cannot be installed. It waits on SLURM's
states and the runs' own files, never for a fixed time.

    pytest -q -m multinode
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from test_pretrain_data import make_texts, write_shards
from test_finetune import beir_dir, tiny_model, tokenizer  # noqa: F401  fixtures
from test_slurm import FINAL_STATES, TINY, WORDS, job_info, read_logs, sbatch, steps, wait_for

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
NODES = 3
MAX_STEPS = 12
SAVE_STEPS = 4
DDP_TIMEOUT = 90  # longer than SLURM takes to call a silent node DOWN (3 x SlurmdTimeout=10)
ONE_NODE = ("--nodes=1", "--ntasks-per-node=2")
TWO_NODES = ("--nodes=2", "--ntasks-per-node=1")


def cluster(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER), *args], env=env, capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment for sbatch/scontrol pointing at the module's 3-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces and the SLURM daemons need root")
    state = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "DUPMAE_SLURM_DIR": "/tmp/dupmae-slurm-multinode", "DUPMAE_SLURM_CTLD_PORT": "6827",
           "DUPMAE_SLURM_SLURMD_PORT": "6828"}
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)  # the tests pass without them
    started = time.monotonic()
    up = cluster(env, "start", "--nodes", str(NODES), check=False)
    if up.returncode != 0:
        if not all(shutil.which(tool) for tool in ("munged", "slurmctld", "slurmd", "sbatch")):
            pytest.skip(f"the SLURM/munge Debian packages could not be installed: {up.stderr.strip()}")
        pytest.fail(f"local_cluster.sh start --nodes {NODES} failed:\n{up.stdout}{up.stderr}")
    print(f"cluster of {NODES} nodes up in {time.monotonic() - started:.1f} s")
    env["SLURM_CONF"] = str(Path(env["DUPMAE_SLURM_DIR"]) / "slurm.conf")
    env.update(PYTHON=sys.executable, REPO=str(REPO), LOG_ROOT=str(state / "logs"), DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    yield env
    started = time.monotonic()
    cluster(env, "stop")
    print(f"cluster stopped in {time.monotonic() - started:.1f} s")
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith("dupmae-6827-")]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, minilm_path) -> Path:
    from common.tokenizer import load_tokenizer

    return write_shards(tmp_path_factory.mktemp("shards"), load_tokenizer(minilm_path), make_texts(64), num_shards=2)


class Pretrain:
    """One `sbatch slurm/pretrain.sbatch` training the tiny model on CPU into `output_dir`."""

    def __init__(self, env: dict, shard_dir: Path, model: str, output_dir: Path, flags: tuple[str, ...],
                 *extra: str):
        self.env = {**env, "DATA_DIR": str(shard_dir), "MODEL": model, "OUTPUT_DIR": str(output_dir)}
        self.output_dir = output_dir
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.id = sbatch(self.env, "pretrain.sbatch", "--config_overrides", TINY, "--max_seq_length", "64",
                         "--per_device_train_batch_size", "4", "--max_steps", str(MAX_STEPS), "--logging_steps", "1",
                         "--seed", "7", "--disable_tqdm", *extra,
                         flags=(*flags, "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                                f"--output={output_dir.parent}/slurm-%j.out"))
        self.log_dir = Path(env["LOG_ROOT"]) / f"dupmae-pretrain-{self.id}"

    def info(self) -> dict[str, str]:
        return job_info(self.env, self.id)

    def wait(self, timeout: float = 300.0) -> dict[str, str]:
        return wait_for(self.env, self.id, self.log_dir, timeout)

    def logs(self) -> str:
        return read_logs(self.log_dir)

    def rank_log(self, rank: int) -> str:
        path = self.log_dir / f"rank-{rank}.log"
        return path.read_text() if path.is_file() else ""

    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def wait_until(self, done, what: str, timeout: float = 300.0) -> None:
        """Polls `done()` while the job is not finished."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"job {self.id}: no {what} after {timeout:.0f} s\n{self.logs()}"
            assert self.info()["JobState"] not in FINAL_STATES, f"job {self.id} ended before {what}\n{self.logs()}"
            time.sleep(0.1)


def rendezvous(log: str) -> tuple[str, str]:
    """(host, address) from a rank's line 'rank R on HOST: rendezvous ..., gloo on IF ADDRESS (...)'."""
    found = re.search(r"rank \d+ on (\S+): rendezvous \S+ \(\S+\), gloo on \S+ (\S+) ", log)
    assert found, log
    return found.group(1), found.group(2)


@pytest.fixture(scope="module")
def straight_runs(slurm_env, shard_dir, minilm_path, tmp_path_factory) -> dict[str, Pretrain]:
    """The same job straight through as 2 tasks on one node and as 1 task on each of 2 nodes, queued together."""
    jobs = {name: Pretrain(slurm_env, shard_dir, minilm_path, tmp_path_factory.mktemp(name) / "out", flags,
                           "--save_steps", str(SAVE_STEPS))
            for name, flags in (("one-node", ONE_NODE), ("two-nodes", TWO_NODES))}
    for job in jobs.values():
        job.final = job.wait()
    return jobs


@pytest.fixture(scope="module")
def two_node_run(straight_runs) -> Pretrain:
    assert straight_runs["two-nodes"].final["JobState"] == "COMPLETED", straight_runs["two-nodes"].logs()
    return straight_runs["two-nodes"]


def test_pretrain_across_two_nodes_equals_one_node(straight_runs):
    job, one_node_run = straight_runs["two-nodes"], straight_runs["one-node"]
    assert one_node_run.final["JobState"] == "COMPLETED", one_node_run.logs()
    assert job.final["JobState"] == "COMPLETED", job.logs()
    assert job.final["NumNodes"] == "2"
    hosts, addresses = zip(*(rendezvous(job.rank_log(rank)) for rank in (0, 1)))
    assert len(set(hosts)) == 2 and len(set(addresses)) == 2, job.logs()
    assert all(re.fullmatch(r"10\.213\.\d+\.\d+", address) for address in addresses), addresses
    assert f"rendezvous {hosts[0]}:" in job.rank_log(1)  # MASTER_ADDR is the first node
    # fp32 gloo all-reduce of 2 ranks over the virtual link: exactly the numbers of the 2 ranks on one node
    assert [m["step"] for m in job.metrics()] == list(range(1, MAX_STEPS + 1))
    assert steps(job.metrics()) == steps(one_node_run.metrics())
    assert (job.output_dir / "export" / "config.json").is_file()


def test_an_output_folder_the_nodes_do_not_share_is_refused_before_any_step(slurm_env, shard_dir, minilm_path,
                                                                             tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # node-local scratch: node2 sees its own empty tmpfs at the same path, node1 the shared folder
    cluster(slurm_env, "exec", "node2", "mount", "-t", "tmpfs", "-o", "size=16m", "scratch", str(out))
    try:
        job = Pretrain(slurm_env, shard_dir, minilm_path, out, ("--nodelist=node1,node2", *TWO_NODES),
                       "--save_steps", str(SAVE_STEPS))
        final = job.wait()
    finally:
        cluster(slurm_env, "exec", "node2", "umount", str(out))
    assert final["JobState"] == "FAILED", job.logs()
    assert re.search(r"srun: error: node\d: task \d: Exited with exit code 2", (job.log_dir / "batch.log").read_text())
    expected = (f"output folder {out} is not shared by all ranks: rank 0 (node1) cannot see the files of rank(s) "
                f"1 (node2); rank 1 (node2) cannot see the files of rank(s) 0 (node1); put it on a filesystem "
                f"that every node mounts")
    # the same line on every rank that srun did not end first, once another had exited
    errors = [[line for line in job.rank_log(rank).splitlines() if " ERROR " in line] for rank in (0, 1)]
    assert sorted(map(len, errors)) in ([0, 1], [1, 1]), job.logs()
    assert all(line.endswith(expected) for lines in errors for line in lines), job.logs()
    assert "optimizer steps" not in job.rank_log(0)  # refused before the data loader and the model were built
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_finetune_with_cross_device_negatives_across_two_nodes_equals_one_node(slurm_env, tiny_model, beir_dir,
                                                                                tmp_path):
    negatives = tmp_path / "negs.jsonl"
    negatives.write_text("".join(json.dumps({"query_id": f"q{i}", "negatives": [f"d{j}" for j in range(30)]}) + "\n"
                                 for i in range(12)))
    jobs = {}
    for name, flags in (("one-node", ONE_NODE), ("two-nodes", TWO_NODES)):  # both queued at once
        env = {**slurm_env, "MODEL": str(tiny_model), "DATA_DIR": str(beir_dir), "OUTPUT_DIR": str(tmp_path / name),
               "DS_CONFIG": "ds_configs/finetune_cpu.json"}
        job_id = sbatch(env, "finetune.sbatch", "--negatives", str(negatives), "--train_group_size", "3",
                        "--per_device_train_batch_size", "2", "--passage_max_length", "24", "--max_steps", "4",
                        "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--representation",
                        "dupmae", "--top_k", "16", "--cross_device_negatives",
                        flags=(*flags, "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"))
        jobs[name] = (job_id, Path(slurm_env["LOG_ROOT"]) / f"dupmae-finetune-{job_id}")
    for name, (job_id, log_dir) in jobs.items():
        final = wait_for(slurm_env, job_id, log_dir)
        assert final["JobState"] == "COMPLETED", read_logs(log_dir)
    job_id, log_dir = jobs["two-nodes"]
    assert job_info(slurm_env, job_id)["NumNodes"] == "2"
    assert len({rendezvous((log_dir / f"rank-{rank}.log").read_text()) for rank in (0, 1)}) == 2  # 2 hosts, 2 addresses
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("one-node", "two-nodes"))
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    # the ranks' passages gathered over the link: every number of every step exactly, all but the timing
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in two] == [
        {k: v for k, v in m.items() if k != "seconds"} for m in one]


def test_evaluate_shards_on_two_nodes_merge_to_one_nodes_metrics(slurm_env, minilm_path, tmp_path):
    beir = tmp_path / "tiny"
    (beir / "qrels").mkdir(parents=True)
    docs = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(i % 5 + 6)) for i in range(30)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n"
                                               for i, text in enumerate(docs)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": " ".join(docs[3 * i].split()[:3])})
                                                + "\n" for i in range(6)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{3 * i}\t1\n"
                                                                                      for i in range(6)))
    jobs = {}
    for name, flags in (("one-node", ONE_NODE), ("two-nodes", TWO_NODES)):
        env = {**slurm_env, "MODEL": minilm_path, "DATASETS": str(beir), "OUTPUT_DIR": str(tmp_path / name)}
        job_id = sbatch(env, "evaluate.sbatch", "--batch_size", "8",
                        flags=(*flags, "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out"))
        jobs[name] = (job_id, Path(slurm_env["LOG_ROOT"]) / f"dupmae-evaluate-{job_id}")
    for name, (job_id, log_dir) in jobs.items():
        assert wait_for(slurm_env, job_id, log_dir)["JobState"] == "COMPLETED", read_logs(log_dir)
    job_id, log_dir = jobs["two-nodes"]
    for task in (0, 1):  # task i encoded and searched shard i, on its own node
        assert f"tiny: shard {task}/2 encoded" in (log_dir / f"rank-{task}.log").read_text(), read_logs(log_dir)
    assert job_info(slurm_env, job_id)["NumNodes"] == "2"
    one, two = (json.loads((tmp_path / name / "results.json").read_text())["tiny"] for name in ("one-node", "two-nodes"))
    assert two == one and 0 < two["nDCG@10"] <= 1


def test_usr1_reaches_both_nodes_which_checkpoint_requeue_and_resume_to_the_same_losses(
        slurm_env, shard_dir, minilm_path, tmp_path, two_node_run):
    job = Pretrain(slurm_env, shard_dir, minilm_path, tmp_path / "out", TWO_NODES, "--save_steps", str(SAVE_STEPS))
    job.wait_until(job.metrics, "step logged")  # training has started: signal handlers are in place
    # what SLURM does before the time limit (--signal=B:USR1@120): USR1 to the batch shell on the first node only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], env=slurm_env, check=True)
    final = job.wait()
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", job.logs()
    stopped = re.findall(r"preempted at step (\d+)", job.rank_log(0))
    assert len(stopped) == 1 and 1 <= int(stopped[0]) < MAX_STEPS, job.logs()
    # both nodes saved their own part of that step's checkpoint, and both ran again
    checkpoint = job.output_dir / "checkpoints" / f"step-{int(stopped[0]):08d}"
    assert [len(list(checkpoint.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))) for rank in (0, 1)] == [1, 1]
    for rank, node in ((0, "node1"), (1, "node2")):
        assert re.findall(r"rank \d on (\S+): rendezvous", job.rank_log(rank)) == [node, node], job.logs()
    assert steps(job.metrics()) == steps(two_node_run.metrics())


class Stalled:
    """Rank 0 of a job logs each step by opening metrics.jsonl, writing a line and closing it; as a FIFO that the
    test reads up to a chosen step, rank 0 blocks at the next one and the run stands still there (the other rank
    waits in its next collective). `release` puts the lines into a plain metrics.jsonl, as rank 0 would have
    written them (`kept`: those of earlier runs up to the checkpoint this one resumed from), for the next run."""

    def __init__(self, job: Pretrain, step: int, kept: list[str], timeout: float = 240):
        self.path, self.lines = job.output_dir / "metrics.jsonl", list(kept)

        def read() -> None:
            while len(self.lines) == len(kept) or json.loads(self.lines[-1])["step"] < step:
                with open(self.path) as handle:  # blocks until rank 0 opens it to log a step
                    self.lines.extend(handle.read().splitlines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        assert not reader.is_alive(), f"no step {step} logged:\n{job.logs()}"

    def release(self) -> None:
        self.path.unlink()
        self.path.write_text("".join(line + "\n" for line in self.lines))


def stalled_job(slurm_env, shard_dir, minilm_path, out: Path, step: int) -> tuple[Pretrain, Stalled]:
    """A 2-node job into `out` (resumed when it holds a checkpoint) standing still after `step`."""
    out.mkdir(parents=True, exist_ok=True)
    kept = []
    if (out / "metrics.jsonl").is_file():  # what the resumed run keeps (common/metrics_log.py)
        resume_step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
        kept = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["step"] <= resume_step]
        (out / "metrics.jsonl").unlink()
    os.mkfifo(out / "metrics.jsonl")
    job = Pretrain(slurm_env, shard_dir, minilm_path, out, TWO_NODES, "--save_steps", str(SAVE_STEPS),
                   "--ddp_timeout", str(DDP_TIMEOUT))
    return job, Stalled(job, step, kept)


def other_node(slurm_env, job: Pretrain) -> str:
    """The job's node that does not run its batch script."""
    info = job.info()
    nodes = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], env=slurm_env, capture_output=True,
                           text=True, check=True).stdout.split()
    return next(node for node in nodes if node != info["BatchHost"])


def node_state(slurm_env, node: str) -> str:
    return subprocess.run(["sinfo", "--noheader", "--Node", "--nodes", node, "--format=%T"], env=slurm_env,
                          capture_output=True, text=True, check=True).stdout.strip()


def rank_pid(slurm_env, node: str) -> int:
    """The pid of the pre-training task on `node` (one task per node), found among its namespace's processes."""
    pids = subprocess.run(["ip", "netns", "pids", f"dupmae-{slurm_env['DUPMAE_SLURM_CTLD_PORT']}-{node}"],
                          capture_output=True, text=True, check=True).stdout.split()
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"pretrain/main.py") for part in command) and b"-c" not in command:
            return int(pid)
    raise AssertionError(f"no pretrain/main.py task on {node}")


def test_a_killed_rank_then_a_lost_node_each_resume_from_the_last_checkpoint_to_the_same_losses(
        slurm_env, shard_dir, minilm_path, tmp_path, two_node_run):
    """One output folder through three jobs: (i) a rank SIGKILLed after checkpoint 4 ends the job at once; the same
    command submitted again resumes from 4 and (ii) loses a node after checkpoint 8 (its link down, as a node that
    dies): SLURM marks it DOWN and requeues the job onto the nodes left, which resume from 8 to the end."""
    out = tmp_path / "out"
    job, stall = stalled_job(slurm_env, shard_dir, minilm_path, out, SAVE_STEPS + 2)
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{SAVE_STEPS:08d}"
    node = other_node(slurm_env, job)
    killed = time.monotonic()
    os.kill(rank_pid(slurm_env, node), signal.SIGKILL)  # as the OOM killer or a crash would
    final = job.wait()
    ended = time.monotonic() - killed
    assert final["JobState"] == "FAILED" and ended < DDP_TIMEOUT / 3, (ended, job.logs())  # --kill-on-bad-exit
    lost = [line for line in (job.log_dir / "batch.log").read_text().splitlines() if "Killed" in line]
    assert lost == [f"srun: error: {node}: task 1: Killed"], job.logs()
    stall.release()

    job, stall = stalled_job(slurm_env, shard_dir, minilm_path, out, 2 * SAVE_STEPS + 2)  # submitted again
    assert re.search(rf"resumed from \S*/step-{SAVE_STEPS:08d}\b", job.rank_log(0)), job.logs()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{2 * SAVE_STEPS:08d}"
    node = other_node(slurm_env, job)
    link = f"dm{slurm_env['DUPMAE_SLURM_CTLD_PORT']}br-{node.removeprefix('node')}"
    cut = time.monotonic()
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    try:
        stall.release()
        while not node_state(slurm_env, node).startswith("down"):
            assert time.monotonic() - cut < DDP_TIMEOUT, f"{node} not DOWN after {DDP_TIMEOUT} s\n{job.logs()}"
            time.sleep(0.5)
        down = time.monotonic() - cut
        while not (job.info()["Restarts"] == "1" and job.info()["JobState"] == "RUNNING"):
            assert time.monotonic() - cut < DDP_TIMEOUT, f"not requeued {DDP_TIMEOUT} s after the cut\n{job.logs()}"
            time.sleep(0.5)
        requeued = time.monotonic() - cut
        final = job.wait()
    finally:
        subprocess.run(["ip", "link", "set", link, "up"], check=True)
    print(f"{node} DOWN {down:.0f} s after its link went down, job running again after {requeued:.0f} s")
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", job.logs()
    assert node not in subprocess.run(["scontrol", "show", "hostnames", final["NodeList"]], env=slurm_env,
                                      capture_output=True, text=True, check=True).stdout.split()
    assert re.search(rf"resumed from \S*/step-{2 * SAVE_STEPS:08d}\b", job.rank_log(0)), job.logs()
    assert steps(job.metrics()) == steps(two_node_run.metrics())
    # the node answers again; `start` (idempotent) resumes it at once instead of at SLURM's next ping of it
    cluster(slurm_env, "start", "--nodes", str(NODES))
    assert node_state(slurm_env, node) == "idle"


def install_ssh_and_pdsh() -> None:
    """Debian's openssh-server and pdsh, installed as local_cluster.sh installs SLURM (root, apt-get), so that CI
    runs the launcher test instead of skipping it; skipped only where they cannot be installed."""
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server", "pdsh"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("needs Debian's openssh-server and pdsh: apt-get install openssh-server pdsh")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"could not install openssh-server and pdsh: {done.stderr.strip()[-300:]}")


@pytest.fixture
def ssh_nodes(slurm_env, tmp_path):
    """sshd inside node1 and node2 (Debian's openssh-server), with a host key and a client key made here; the
    client side is an ssh config file that pdsh is pointed at (PDSH_SSH_ARGS), so root's ~/.ssh is left alone."""
    if not (shutil.which("sshd", path="/usr/sbin:/usr/bin") and shutil.which("pdsh")):
        install_ssh_and_pdsh()
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "id_ed25519.pub").read_text())
    (keys / "config").write_text(f"Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                                 f"  LogLevel ERROR\n  IdentityFile {keys / 'id_ed25519'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
    pids = []
    try:
        for node in ("node1", "node2"):
            address = cluster(slurm_env, "exec", node, "hostname", "-I").stdout.split()[0]
            config = keys / f"sshd_config_{node}"
            config.write_text(f"ListenAddress {address}\nHostKey {keys / 'host_key'}\nAuthorizedKeysFile "
                              f"{keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                              f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                              f"StrictModes no\nPidFile {keys / f'sshd-{node}.pid'}\n")
            cluster(slurm_env, "exec", node, "/usr/sbin/sshd", "-f", str(config), "-E", str(keys / f"sshd-{node}.log"))
            pid_file, deadline = keys / f"sshd-{node}.pid", time.monotonic() + 30
            while not pid_file.is_file() or not pid_file.read_text().strip():  # the daemon writes it once detached
                assert time.monotonic() < deadline, (keys / f"sshd-{node}.log").read_text()
                time.sleep(0.05)
            pids.append(int(pid_file.read_text()))
        yield keys
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)


def test_the_deepspeed_launcher_runs_across_two_nodes_over_pdsh_and_ssh(slurm_env, ssh_nodes, shard_dir, minilm_path,
                                                                       tmp_path, two_node_run):
    """`deepspeed --hostfile` from node1 starts one rank on each node through pdsh/ssh, with no SLURM in the
    ranks' way; they train to the same numbers as the 2-node SLURM job."""
    keys, out = ssh_nodes, tmp_path / "out"
    (keys / "hostfile").write_text("node1 slots=1\nnode2 slots=1\n")
    # what the remote ranks need in their environment (sshd gives a clean one): ~/.deepspeed_env, with HOME here
    (keys / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nHF_HUB_OFFLINE=1\nTOKENIZERS_PARALLELISM=false\n"
                                         "OMP_NUM_THREADS=1\n")
    launcher = Path(sys.executable).with_name("deepspeed")
    done = subprocess.run(
        [str(CLUSTER), "exec", "node1", "env", "-C", str(REPO), f"HOME={keys}", "DS_ACCELERATOR=cpu",
         f"PDSH_SSH_ARGS=-F {keys / 'config'} -l%u %h", str(launcher), "--hostfile", str(keys / "hostfile"),
         "--master_addr", "node1", "--master_port", "29650", "--no_ssh_check", "pretrain/main.py", "--deepspeed",
         "ds_configs/zero2.json", "--data_dir", str(shard_dir), "--model_name_or_path", minilm_path,
         "--output_dir", str(out), "--resume", "auto", "--config_overrides", TINY, "--max_seq_length", "64",
         "--per_device_train_batch_size", "4", "--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--seed", "7",
         "--disable_tqdm", "--save_steps", str(SAVE_STEPS)],
        env=slurm_env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "cmd = pdsh -S -f 1024 -w node1,node2 " in log
    ranks = sorted(rendezvous(line) for line in log.splitlines() if "rendezvous node1:29650" in line)
    assert [host for host, _ in ranks] == ["node1", "node2"], log[-6000:]
    assert len({address for _, address in ranks}) == 2 and all(a.startswith("10.213.") for _, a in ranks), ranks
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps(metrics) == steps(two_node_run.metrics())
