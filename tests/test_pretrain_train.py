"""Pre-training end to end on CPU through the real launchers (`deepspeed`, torchrun): 2 ranks, ZeRO-2, bf16, gloo.

One uninterrupted 4-step run is the reference; a run stopped at step 2 (--stop_at_step) and resumed
(--resume auto) must log the very same per-step numbers; a rank signalled with SIGUSR1 must make both ranks
stop at the same step with a checkpoint; the export must load with AutoModel and equal the fp32 master
weights of the last checkpoint. Options and the DeepSpeed "auto" filling are tested in-process.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from common.checkpoint import FILES, read_latest
from common.schedule import lr_factor
from common.shard_format import PRETRAIN_SCHEMA, Manifest, shard_name
from common.tokenizer import load_tokenizer
from pretrain.arguments import ConfigError, TrainingArguments, deepspeed_config, parse_args
from pretrain.data import PretrainShards, RankBatchLoader
from pretrain.shard_integrity import VERIFIED_FILE, file_sha256
from test_pretrain_data import change_one_byte, make_texts, write_shards

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
STEPS = 4
COMPARED = ("loss", "mlm_loss", "decoder_loss", "bow_loss", "mlm_accuracy", "decoder_accuracy", "bow_recall",
            "grad_norm", "lr", "epoch")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer, make_texts(48), max_seq_length=64)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(shard_dir: Path, out: Path, *extra: str, launcher: str = "deepspeed") -> list[str]:
    """The real launchers: `deepspeed --num_gpus 2` (CPU accelerator, gloo) or torchrun with 2 processes."""
    if launcher == "deepspeed":
        prefix = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2"]
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*prefix, "--master_port", str(_free_port()), "pretrain/main.py",
            "--deepspeed", "ds_configs/zero2.json", "--bf16", "true",  # bf16 on every machine, as before auto
            "--data_dir", str(shard_dir), "--output_dir", str(out),
            "--config_overrides", TINY, "--max_seq_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2",
            "--max_steps", str(STEPS), "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "1",
            "--disable_tqdm", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run(shard_dir: Path, out: Path, *extra: str, launcher: str = "deepspeed") -> tuple[int, str]:
    """Run the launcher to completion: (exit code, combined output)."""
    done = subprocess.run(_command(shard_dir, out, *extra, launcher=launcher), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def launch(shard_dir: Path, out: Path, *extra: str, launcher: str = "deepspeed") -> str:
    """Run the launcher to completion; return its combined output (asserting exit 0)."""
    code, log = run(shard_dir, out, *extra, launcher=launcher)
    assert code == 0, log[-4000:]
    return log


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shard_dir) -> Path:
    out = tmp_path_factory.mktemp("straight")
    launch(shard_dir, out)
    return out


@pytest.mark.slow
def test_two_rank_zero2_run_finishes_and_logs(straight, shard_dir):
    records = metrics(straight)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert all(math.isfinite(record[key]) for key in COMPARED)
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > record["samples_per_s"]
    last = records[-1]
    assert last["loss"] == pytest.approx(last["mlm_loss"] + last["decoder_loss"] + last["bow_loss"], rel=1e-5)
    # warm-up ceil(0.1 * 4) = 1 step from 0 (HF's schedule), then linear decay to 0 at step 4 (lr logged is the
    # one each step used)
    assert [r["lr"] for r in records] == pytest.approx([1e-4 * f for f in (0, 1, 2 / 3, 1 / 3)])
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((straight / VERIFIED_FILE).read_text())["data_dir"] == str(shard_dir.resolve())
    checkpoints = straight / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000004"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-00000004"]  # --save_total_limit 1
    # ZeRO-2 with 2 ranks: the optimizer state is partitioned, one file per rank
    assert len(list((checkpoints / "step-00000004").glob("*zero_pp_rank_*_optim_states.pt"))) == 2


@pytest.mark.slow
def test_stop_and_resume_logs_the_same_steps(tmp_path, shard_dir, straight):
    out = tmp_path / "resumed"
    # torchrun here (the deepspeed launcher made the reference), and with gradient checkpointing (recomputation
    # replays dropout with the saved RNG state): the same numbers whatever the launcher and the memory setting
    log = launch(shard_dir, out, "--stop_at_step", "2", "--resume", "auto", "--gradient_checkpointing",
                 launcher="torchrun")
    assert "stopped at step 2" in log
    assert (out / "checkpoints" / "latest").read_text() == "step-00000002"
    assert not (out / "export").exists()
    log = launch(shard_dir, out, "--resume", "auto", "--gradient_checkpointing", launcher="torchrun")
    assert "resumed from" in log and "step-00000002" in log
    assert "shards verified earlier" in log  # hashed once, by the first half
    resumed, reference = metrics(out), metrics(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no duplicates after resume
    for ours, theirs in zip(resumed, reference):
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}, ours["step"]


@pytest.mark.slow
def test_export_loads_with_automodel_and_keeps_fp32_master_weights(straight, tokenizer):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModel, AutoModelForMaskedLM

    export = straight / "export"
    encoder = AutoModel.from_pretrained(export).eval()
    _, info = AutoModelForMaskedLM.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"]  # the MLM head is exported too
    master = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag="step-00000004")
    reference = type(encoder)(encoder.config, add_pooling_layer=False).eval()  # the pooler is not trained
    names = reference.state_dict().keys()
    matched = {name: next(v for k, v in master.items() if k.endswith(f"bert.{name}")) for name in names}
    reference.load_state_dict(matched)
    batch = tokenizer(["dense retrieval with a duplex masked auto-encoder", "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = encoder(**batch).last_hidden_state, reference(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # bf16 training: the exported weights are the fp32 masters, not the bf16 working copies
    weight = encoder.embeddings.word_embeddings.weight
    assert not torch.equal(weight, weight.bfloat16().float())


@pytest.mark.slow
def test_resuming_another_runs_last_checkpoint_exports_it(tmp_path, shard_dir, straight):
    """--resume OTHER/checkpoints/step-N with N the last step: nothing left to train or save, and the export comes
    from the loaded checkpoint, equal to the other run's."""
    from safetensors.torch import load_file

    out = tmp_path / "again"
    log = launch(shard_dir, out, "--resume", str(straight / "checkpoints" / "step-00000004"))
    assert "finished training at step 4" in log
    assert not list((out / "checkpoints").glob("step-*"))
    ours, theirs = (load_file(folder / "export" / "model.safetensors") for folder in (out, straight))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.slow
def test_a_resume_on_another_number_of_ranks_is_one_line_and_exit_2(tmp_path, shard_dir, straight):
    """The 2-rank checkpoint resumed by 1 rank: one line and exit 2, before DeepSpeed reads the checkpoint (its own
    check raised a ZeRORuntimeException traceback on every rank, exit 1). A grown world: the fine-tuning test of
    the same name (the same check, in common/checkpoint.py)."""
    checkpoint = straight / "checkpoints" / "step-00000004"
    command = _command(shard_dir, tmp_path, "--resume", str(checkpoint))
    command = [sys.executable, *command[command.index("pretrain/main.py"):]]  # a world of one, without a launcher
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    line = (f"--resume {checkpoint}: written by 2 ranks, this run has 1; a checkpoint resumes only on the number of "
            "ranks that wrote it (ZeRO splits the optimizer state and the data by rank)")
    assert done.returncode == 2 and log.count(line) == 1 and "Traceback" not in log, log[-4000:]
    assert not list((tmp_path / "checkpoints").glob("step-*"))


class Crash:
    """Hard crashes at chosen points of a real multi-rank run, with no hook in the code under test.

    A FIFO stands in for one file the run writes: opening it for writing blocks until the test opens it for
    reading, as a hung filesystem blocks a write. So the test decides where a rank stalls, then SIGKILLs a
    rank there, as an OOM kill or a lost node would: nothing runs on the way out (no handler, no atexit),
    and the launcher kills the other ranks."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path):
        self.log = log
        with open(log, "w") as handle:  # a file, not a pipe: an undrained pipe would stall the run itself
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)

    def read_fifo_until(self, fifo: Path, step: int, timeout: float = 240) -> str:
        """The lines rank 0 logs through the FIFO metrics.jsonl (each log opens it, writes a line, closes it),
        up to `step`'s; the test then stops reading, so rank 0 blocks when it logs the next step."""
        lines: list[str] = []

        def read() -> None:
            while not lines or json.loads(lines[-1])["step"] < step:
                with open(fifo) as handle:  # blocks until rank 0 opens it to log a step
                    lines.extend(handle.read().splitlines())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        assert not reader.is_alive(), f"no step {step} logged:\n{self.log.read_text()[-4000:]}"
        return "".join(line + "\n" for line in lines)

    def wait_for(self, path: Path, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not path.exists():
            assert self.process.poll() is None and time.time() < deadline, self.log.read_text()[-4000:]
            time.sleep(0.05)

    def kill_rank(self, rank: int, timeout: float = 120) -> None:
        import psutil

        workers = psutil.Process(self.process.pid).children(recursive=True)
        next(p for p in workers if p.environ().get("RANK") == str(rank)).send_signal(signal.SIGKILL)
        assert self.process.wait(timeout) != 0


def stall(path: Path) -> None:
    """Make `path` a FIFO: the run's write of it blocks (see Crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)


def kill_between_checkpoints(command: list[str], env: dict[str, str], out: Path) -> None:
    """A run of 4 steps with checkpoints at 2 and 4, killed after step 4's optimizer step, before its checkpoint.

    metrics.jsonl is a FIFO: the test reads steps 1-3, so rank 0 blocks logging step 4 and rank 1 waits for it in
    the checkpoint's first collective. SIGKILL rank 1. The lines read then go to a plain metrics.jsonl, as rank 0
    wrote them."""
    stall(out / "metrics.jsonl")
    crash = Crash(command, env, out.parent / f"{out.name}-killed-between.log")
    lines = crash.read_fifo_until(out / "metrics.jsonl", 3)
    crash.kill_rank(1)
    checkpoints = out / "checkpoints"
    assert read_latest(checkpoints) == "step-00000002" and not (checkpoints / "step-00000004").exists()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").write_text(lines)


def kill_during_checkpoint_write(command: list[str], env: dict[str, str], out: Path) -> None:
    """The same run resumed from checkpoint 2, killed while it writes checkpoint 4.

    Rank 1's optimizer file of checkpoint 4 is a FIFO: rank 0 writes its files, rank 1 blocks in its write.
    SIGKILL rank 1. A half-written file then takes the FIFO's place, as a killed write leaves one."""
    checkpoints = out / "checkpoints"
    names = {rank: next((checkpoints / "step-00000002").glob(f"*zero_pp_rank_{rank}_*optim_states.pt")).name
             for rank in (0, 1)}
    stall(checkpoints / "step-00000004" / names[1])
    crash = Crash(command, env, out.parent / f"{out.name}-killed-writing.log")
    crash.wait_for(checkpoints / "step-00000004" / names[0])
    crash.kill_rank(1)
    assert "resumed from" in crash.log.read_text() and read_latest(checkpoints) == "step-00000002"
    half = (checkpoints / "step-00000004" / names[0]).read_bytes()
    (checkpoints / "step-00000004" / names[1]).unlink()
    (checkpoints / "step-00000004" / names[1]).write_bytes(half[: len(half) // 2])


@pytest.mark.slow
def test_sigkill_between_checkpoints_and_during_a_checkpoint_write_then_resume_auto(tmp_path, shard_dir, straight):
    """The reference run again, killed with SIGKILL between checkpoints and then during a checkpoint write (see
    kill_between_checkpoints, kill_during_checkpoint_write), each time resumed with `--resume auto` as a
    requeued job is: the last run continues from checkpoint 2 and logs the very same per-step numbers as the
    uninterrupted run."""
    out = tmp_path / "out"
    kill_between_checkpoints(_command(shard_dir, out, "--resume", "auto"), _env(), out)
    kill_during_checkpoint_write(_command(shard_dir, out, "--resume", "auto"), _env(), out)
    assert_resume_auto_matches(shard_dir, out, straight)


def assert_resume_auto_matches(shard_dir: Path, out: Path, straight: Path) -> None:
    """`--resume auto` continues from checkpoint 2 and logs the uninterrupted run's per-step numbers to the end."""
    log = launch(shard_dir, out, "--resume", "auto")
    assert "resumed from" in log and "step-00000002" in log
    resumed, reference = metrics(out), metrics(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed, reference):
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}, ours["step"]
    assert read_latest(out / "checkpoints") == "step-00000004" and (out / "export").is_dir()


def mount_tmpfs(folder: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `folder` (remounted at the new size when mounted already); skips the test
    where mounting is not permitted (test_checkpoint.py then simulates a full disk)."""
    folder.mkdir(exist_ok=True)
    options = f"{'remount,' if os.path.ismount(folder) else ''}size={size}"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_then_resume_auto_after_freeing_space(tmp_path, shard_dir, straight):
    """OUT on a tmpfs of 1.5 checkpoints: step 2 saves, step 4's save does not fit, and says so in one line on
    each rank before writing anything; after the filesystem grows, `--resume auto` logs the uninterrupted run's
    numbers."""
    size = sum(json.loads((straight / "checkpoints" / "step-00000004" / FILES).read_text()).values())
    disk, out = tmp_path / "disk", tmp_path / "disk" / "out"
    mount_tmpfs(disk, size * 3 // 2)
    try:
        code, log = run(shard_dir, out, "--resume", "auto")
        assert code == 4, log[-4000:]
        errors = [line for line in log.splitlines() if " ERROR " in line]
        expected = re.compile(rf"not saving checkpoint {out}/checkpoints/step-00000004 \(step 4\): [\d.]+ MB free in "
                              rf"{out}/checkpoints, {size / (1 << 20):.1f} MB needed \(the size of step-00000002\); "
                              "the previous checkpoint step-00000002 is intact$")
        assert len(errors) == 2 and all(expected.search(line) for line in errors), errors
        checkpoints = out / "checkpoints"
        assert read_latest(checkpoints) == "step-00000002" and not (checkpoints / "step-00000004").exists()
        mount_tmpfs(disk, size * 3)  # space freed
        assert_resume_auto_matches(shard_dir, out, straight)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_after_ddp_timeout(tmp_path, shard_dir):
    """Rank 1 stops (SIGSTOP) in the middle of training. Rank 0 gives up in its collective after --ddp_timeout and
    exits 5 with one line naming the collective and rank 1; the launcher then ends rank 1 and exits non-zero
    (its SIGTERM waits for a stopped process, SIGKILL follows 30 s later)."""
    import psutil

    timeout = 8
    out = tmp_path / "hung"
    log = tmp_path / "hung.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(_command(shard_dir, out, "--max_steps", "400", "--save_steps", "0",
                                            "--ddp_timeout", str(timeout)),
                                   cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and metrics(out)):
            assert process.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        workers = {p.environ().get("RANK"): p for p in psutil.Process(process.pid).children(recursive=True)}
        workers["1"].suspend()
        stalled = time.time()
        workers["0"].wait(timeout + 30)
        rank0_seconds = time.time() - stalled
        assert process.wait(60) == 5  # rank 0's exit code
        run_seconds = time.time() - stalled
    finally:
        process.kill()
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert re.search(rf"collective \w+ failed on rank 0 of 2 \(--ddp_timeout {timeout} s\); rank 1 did not arrive: "
                     rf"Timed out waiting {timeout * 1000}ms", errors[0]), errors[0]
    assert timeout <= rank0_seconds < timeout + 10, rank0_seconds
    print(f"rank 0 exited {rank0_seconds:.1f} s after rank 1 stopped, the launcher {run_seconds:.1f} s")


@pytest.mark.slow
def test_sigusr1_on_one_rank_stops_both_at_the_same_step(tmp_path, shard_dir):
    """Under torchrun this time: rank 1 alone is signalled; both ranks must checkpoint the same step and exit 0."""
    import psutil

    out = tmp_path / "preempted"
    command = _command(shard_dir, out, "--max_steps", "40", "--save_steps", "0", launcher="torchrun")
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and metrics(out)):
            assert process.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        workers = psutil.Process(process.pid).children(recursive=True)
        next(p for p in workers if p.environ().get("RANK") == "1").send_signal(signal.SIGUSR1)
        log, _ = process.communicate(timeout=240)
    finally:
        process.kill()
    assert process.returncode == 0, log[-4000:]
    step = int(log.split("preempted at step ")[1].split()[0])
    assert 1 <= step < 40
    assert metrics(out)[-1]["step"] == step
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    assert len(list((out / "checkpoints" / f"step-{step:08d}").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    assert not (out / "export").exists()


@pytest.mark.slow
def test_a_corrupt_shard_stops_every_rank_before_training(tmp_path, shard_dir):
    data = tmp_path / "data"
    shutil.copytree(shard_dir, data)
    change_one_byte(data / shard_name(1, 3))  # hashed by rank 1 of 2
    out = tmp_path / "out"
    code, log = run(data, out)
    assert code != 0
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors and all(f"{data / shard_name(1, 3)}: sha256" in line for line in errors), log[-4000:]
    assert len(errors) == 2  # one line per rank, the same finding
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints" / "latest").exists()


def poison(source: Path, target: Path, rows: list[int]) -> Path:
    """A copy of the shards in which these rows (global indices, manifest order) have a NaN BoW weight: blocks
    that pass every check (the manifest carries the new sha256) and give a NaN loss on the rank reading them."""
    manifest = Manifest.read(source)
    target.mkdir()
    start = 0
    for info in manifest.shards:
        table = pa.ipc.open_file(str(source / info.file)).read_all().to_pylist()
        for row in rows:
            if start <= row < start + info.rows:
                table[row - start]["bow_weights"][0] = math.nan
        with pa.ipc.new_file(str(target / info.file), PRETRAIN_SCHEMA) as writer:
            writer.write_table(pa.Table.from_pylist(table, schema=PRETRAIN_SCHEMA))
        info.sha256 = file_sha256(target / info.file)
        start += info.rows
    manifest.write(target)
    return target


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_both_and_a_run_of_them_stops(tmp_path, shard_dir):
    """NaN blocks in rank 1's batch of step 2, rank 0's of step 5 and rank 1's of step 6; at most 2 in a row."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    def first_row(rank: int, step: int) -> int:  # the loader's own arithmetic: micro-batches 2(step - 1), +1
        loader = RankBatchLoader(PretrainShards(shard_dir), batch_size=2, rank=rank, world_size=2, seed=42)
        return int(loader.batch_indices(2 * (step - 1))[0])

    data = poison(shard_dir, tmp_path / "data", [first_row(1, 2), first_row(0, 5), first_row(1, 6)])
    out = tmp_path / "out"
    code, log = run(data, out, "--max_steps", "8", "--save_steps", "1", "--save_total_limit", "100",
                    "--max_consecutive_nonfinite", "2")
    assert code == 3, log[-4000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 2, 3]
    assert [math.isfinite(r["loss"]) for r in records] == [True, False, True, True, False, False]
    assert all(math.isfinite(r["grad_norm"]) == math.isfinite(r["loss"]) for r in records)
    assert "step 2: non-finite loss; optimizer step skipped on every rank (1 in a row, 1 in all)" in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 2 and all("stopping at step 6: 2 optimizer steps in a row" in e for e in errors)
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-00000005"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [f"step-{s:08d}" for s in range(1, 6)]
    assert not (out / "export").exists()
    # step 2 changed neither rank's partition (fp32 masters, AdamW step and moments); step 3 changed both
    assert same_partitions(checkpoints / "step-00000001", checkpoints / "step-00000002") == [True, True]
    assert same_partitions(checkpoints / "step-00000002", checkpoints / "step-00000003") == [False, False]
    assert all(torch.isfinite(w).all() for w in get_fp32_state_dict_from_zero_checkpoint(
        str(checkpoints), tag="step-00000005").values())


def same_partitions(a: Path, b: Path) -> list[bool]:
    """Per rank: whether two ZeRO checkpoints hold the same optimizer partition (fp32 master weights, and AdamW's
    step count and moments)."""
    def partitions(folder: Path) -> list[dict]:
        files = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))
        return [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]

    same = []
    for x, y in zip(partitions(a), partitions(b), strict=True):
        masters = all(torch.equal(p, q) for p, q in zip(x["single_partition_of_fp32_groups"],
                                                         y["single_partition_of_fp32_groups"], strict=True))
        moments = [x["base_optimizer_state"]["state"], y["base_optimizer_state"]["state"]]
        assert moments[0].keys() == moments[1].keys() != set()
        same.append(masters and all(torch.equal(v, moments[1][k][n]) for k, s in moments[0].items()
                                    for n, v in s.items()))
    return same


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse formats help with %: a bare % in a help text breaks -h
        parse_args(["-h"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in ("max_consecutive_nonfinite", "no_verify_shards", "bow_include_masked",
                                                 "gradient_checkpointing"))


def test_config_file_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data_dir: /data\noutput_dir: /out\nlearning_rate: 0.0003\nmax_steps: 7\nbow_weight: 0.1\n")
    args = parse_args(["--config", str(config), "--max_steps", "9", "--max_seq_length", "128"])
    assert args.training.learning_rate == 3e-4 and args.training.max_steps == 9
    assert args.loss.bow_weight == 0.1 and args.collator.max_seq_length == 128 and args.data.data_dir == "/data"
    config.write_text("data_dir: /data\noutput_dir: /out\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rat"):
        parse_args(["--config", str(config)])
    with pytest.raises(ConfigError, match="--data_dir is required"):
        parse_args(["--output_dir", "/out"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be >= 1"):
        parse_args(["--data_dir", "/d", "--output_dir", "/o", "--gradient_accumulation_steps", "0"])


def test_deepspeed_auto_fields_come_from_the_flags(tmp_path):
    args = TrainingArguments(output_dir="/o", deepspeed=str(REPO / "ds_configs" / "zero2.json"),
                             per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=0.5,
                             bf16="true")
    config = deepspeed_config(args, world_size=2, total_steps=10)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"],
            config["gradient_clipping"]) == (4, 3, 24, 0.5)
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    fp16_json = str(REPO / "ds_configs" / "zero2_fp16.json")
    fp16 = deepspeed_config(TrainingArguments(output_dir="/o", deepspeed=fp16_json), 1, 10)
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}},
                                  "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto",
                                                                                    "warmup_num_steps": "auto"}}}))
    config = deepspeed_config(TrainingArguments(output_dir="/o", deepspeed=str(custom), learning_rate=2e-4,
                                                warmup_steps=3), 1, 10)
    assert config["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.999]}
    assert config["scheduler"]["params"] == {"total_num_steps": 10, "warmup_num_steps": 3}
    custom.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=16 disagrees with the flags"):
        deepspeed_config(TrainingArguments(output_dir="/o", deepspeed=str(custom)), 1, 10)
    custom.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="no flag fills zero_optimization.reduce_bucket_size"):
        deepspeed_config(TrainingArguments(output_dir="/o", deepspeed=str(custom)), 1, 10)


def test_bad_data_and_vocab_mismatch_fail_before_training(tmp_path, shard_dir, tokenizer, caplog, monkeypatch):
    import pretrain.main
    from pretrain.main import main

    monkeypatch.setattr(pretrain.main, "setup_logging", lambda rank: None)  # keep pytest's log capture

    common = ["--output_dir", str(tmp_path / "out"), "--config_overrides", TINY]
    assert main(["--data_dir", str(tmp_path / "absent"), *common]) == 2
    assert "absent: no such folder" in caplog.text
    other = write_shards(tmp_path / "other", tokenizer, make_texts(8), hash_override="f" * 64)
    caplog.clear()
    assert main(["--data_dir", str(other), *common]) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "differs from the training tokenizer" in errors[0].getMessage()
    caplog.clear()
    assert main(["--data_dir", str(shard_dir), "--max_seq_length", "32", *common]) == 2
    assert "below the shards' max_seq_length 64" in caplog.text
    assert not (tmp_path / "out").exists()  # nothing was started
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "latest").write_text("step-00000002")
    caplog.clear()
    assert main(["--data_dir", str(shard_dir), *common]) == 2  # never overwrite a run unless resuming it
    assert "holds a run: pass --resume auto" in caplog.text


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_a_plain_formula(kind):
    total, warmup, peak = 20, 5, 1e-3
    for step in range(total):
        if step < warmup:
            expected = peak * step / warmup  # HF's get_*_schedule_with_warmup
        else:
            progress = (step - warmup) / (total - warmup)
            expected = peak * ((1 - progress) if kind == "linear" else (1 + math.cos(math.pi * progress)) / 2)
        assert peak * lr_factor(step, warmup=warmup, total=total, kind=kind) == pytest.approx(expected)
    args = TrainingArguments(output_dir="/o", num_train_epochs=2.5, warmup_ratio=0.1)
    assert args.total_steps(steps_per_epoch=6) == 15 and args.warmup(15) == 2
    assert TrainingArguments(output_dir="/o", max_steps=7, num_train_epochs=2.5).total_steps(6) == 7


def _tiny_beir(folder: Path, texts: list[str]) -> Path:
    """A BEIR folder over `texts`: every fourth text's first words are a query whose answer is that text."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(texts)))
    queries = {f"q{i}": " ".join(texts[i].split()[:5]) for i in range(0, len(texts), 4)}
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"{q}\td{q[1:]}\t1\n" for q in queries))
    return folder


@pytest.mark.slow
def test_frozen_encoder_steps_then_its_own_schedule_and_the_retrieval_probe(tmp_path, shard_dir, minilm_path):
    """--freeze_encoder_steps 2 of 3: the packaged encoder's fp32 weights stay exactly its own while the new head
    learns, then move; the probe's step-0 figures are the packaged model's own retrieval on the same data."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModel

    from common.representation import Encoder
    from evaluation.compare import score_representations
    from evaluation.data import load_beir

    beir = _tiny_beir(tmp_path / "beir", make_texts(24, seed=3))
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "pretrain/main.py", "--deepspeed", "ds_configs/zero2_cpu.json",
                           "--data_dir", str(shard_dir), "--output_dir", str(out), "--model_name_or_path", minilm_path,
                           "--max_seq_length", "64", "--per_device_train_batch_size", "2", "--max_steps", "4",
                           "--freeze_encoder_steps", "2", "--learning_rate", "1e-3", "--encoder_learning_rate", "1e-4",
                           "--warmup_steps", "1", "--save_steps", "1", "--logging_steps", "1", "--eval_dataset",
                           str(beir), "--eval_steps", "2", "--eval_max_docs", "0", "--disable_tqdm"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "retrieval probes took" in done.stderr + done.stdout
    masters = {step: get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step-{step:08d}")
               for step in (1, 2, 3, 4)}
    packaged = AutoModel.from_pretrained(minilm_path).state_dict()
    encoder_keys = [k for k in masters[1] if k.startswith("mlm.bert.")]
    assert len(encoder_keys) > 50
    for step in (1, 2, 3):  # frozen for 2 steps, then its warm-up's first step at lr 0 (HF's schedule)
        for key in encoder_keys:
            assert torch.equal(masters[step][key], packaged[key[len("mlm.bert."):]]), (step, key)
    head = "mlm.cls.predictions.transform.dense.weight"
    assert not torch.equal(masters[1][head], masters[2][head])  # the new head learns during the freeze
    moved = [k for k in encoder_keys if not torch.equal(masters[4][k], masters[3][k])]
    assert len(moved) > len(encoder_keys) // 2  # and the encoder after it

    records = metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["encoder_lr"] for r in train] == pytest.approx([0.0, 0.0, 0.0, 1e-4])  # warm-up 1 step: full at 4
    assert [r["lr"] for r in train] == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 * 1 / 3])
    probes = [r for r in records if "eval_seconds" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    for name in ("cls", "mean", "dupmae"):
        assert all(0 <= r[f"eval/{name}/nDCG@10"] <= 1 and 0 <= r[f"eval/{name}/Recall@100"] <= 1 for r in probes)
    own = Encoder.from_pretrained(minilm_path)  # mean + cosine, as it ships
    expected = score_representations({"mean": own}, load_tokenizer(minilm_path), load_beir(beir, "test"),
                                     max_length=128, query_max_length=64)["mean"]
    assert probes[0]["eval/mean/nDCG@10"] == pytest.approx(expected["nDCG@10"], abs=1e-9)
    assert probes[0]["eval/mean/Recall@100"] == pytest.approx(expected["Recall@100"], abs=1e-9)
