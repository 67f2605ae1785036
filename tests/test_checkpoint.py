"""common.checkpoint and common.metrics_log: what a save leaves when it fits, when it does not, when its write
fails (on a 1 MB tmpfs the test mounts, or a simulated one where mounting is not permitted), which checkpoints
a resume accepts, which ones the last-K retention keeps, and a metrics.jsonl cut short by a crash. A fake
engine writes real files; DeepSpeed's own save runs in the 2-rank test at the end and in test_pretrain_train.py."""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from common import checkpoint as checkpoint_module
from common.checkpoint import (FILES, RANKS, Checkpointer, CheckpointSaveError, ResumeWorldSizeError, read_latest,
                               resolve_resume, saved_world_size)
from common.metrics_log import keep_steps_up_to
from common.nonfinite import NonFiniteError

KB = 1 << 10


class FakeEngine:
    """Writes a checkpoint as DeepSpeed does (a tag folder of torch.save files) holding `payload` bytes."""

    device = torch.device("cpu")
    world_size = 1

    def __init__(self, payload: int = KB):
        self.payload = payload
        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours, written atomically after every rank finished
        folder = Path(save_dir) / tag
        folder.mkdir(exist_ok=True)
        torch.save(client_state, folder / "client_state.pt")
        torch.save(torch.zeros(self.payload, dtype=torch.uint8), folder / "optim_states.pt")


@pytest.fixture
def small_disk(tmp_path, monkeypatch) -> Path:
    """A 1 MB filesystem: a tmpfs where this machine lets the test mount one (root), else a simulation of one
    (disk_usage reports 1 MB minus the files below it, and a torch.save past that raises ENOSPC)."""
    root = tmp_path / "disk"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True).returncode:
        used = lambda: sum(p.stat().st_size for p in root.rglob("*") if p.is_file())  # noqa: E731
        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage",
                            lambda path: namedtuple("usage", "total used free")(1024 * KB, used(), 1024 * KB - used()))
        save = torch.save

        def full_disk_save(obj, path):
            if isinstance(obj, torch.Tensor) and used() + obj.numel() > 1024 * KB:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            save(obj, path)

        monkeypatch.setattr(torch, "save", full_disk_save)
        yield root
        return
    yield root
    subprocess.run(["umount", str(root)], check=True)


def test_a_full_disk_says_so_before_writing_or_removes_the_partial_save(small_disk):
    checkpointer = Checkpointer(small_disk / "checkpoints", save_total_limit=None, rank=0)
    checkpointer.save(FakeEngine(450 * KB), 1, {"step": 1})  # about 0.55 MB left
    with pytest.raises(CheckpointSaveError) as info:  # fits by the last size (0.45 MB), then fills the disk
        checkpointer.save(FakeEngine(2048 * KB), 2, {"step": 2})
    assert str(info.value).startswith(f"checkpoint {checkpointer.dir / 'step-00000002'} (step 2) could not be "
                                      "written on rank 0: no space left on device")
    assert str(info.value).endswith(f"removed it, {checkpointer.dir / 'latest'} still names step-00000001")
    assert not (checkpointer.dir / "step-00000002").exists() and read_latest(checkpointer.dir) == "step-00000001"
    checkpointer.save(FakeEngine(450 * KB), 3, {"step": 3})  # the space came back with the partial folder
    free = shutil.disk_usage(checkpointer.dir).free
    needed = json.loads((checkpointer.dir / "step-00000003" / FILES).read_text())
    with pytest.raises(CheckpointSaveError) as info:
        checkpointer.save(FakeEngine(450 * KB), 4, {"step": 4})
    assert str(info.value) == (
        f"not saving checkpoint {checkpointer.dir / 'step-00000004'} (step 4): {free / (1 << 20):.1f} MB free in "
        f"{checkpointer.dir}, {sum(needed.values()) / (1 << 20):.1f} MB needed (the size of step-00000003); the "
        "previous checkpoint step-00000003 is intact")
    assert not (checkpointer.dir / "step-00000004").exists() and read_latest(checkpointer.dir) == "step-00000003"
    assert sorted(p.name for p in checkpointer.dir.glob("step-*")) == ["step-00000001", "step-00000003"]


def test_a_nonfinite_weight_is_never_saved(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_total_limit=2, rank=0)
    checkpointer.save(FakeEngine(), 6, {"step": 6})
    poisoned = FakeEngine()
    with torch.no_grad():
        poisoned.module.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="not writing checkpoint .*step-00000010: weight's weights hold NaN"):
        checkpointer.save(poisoned, 10, {"step": 10})
    assert not (checkpointer.dir / "step-00000010").exists()
    assert (checkpointer.dir / "latest").read_text() == "step-00000006"


def test_pruning_counts_only_complete_checkpoints(tmp_path):
    """Checkpoints at 500 and 1000 (keep 2), a save at 1234 killed halfway, then the resumed run saves 1500."""
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_total_limit=2, rank=0)
    for step in (500, 1000):
        checkpointer.save(FakeEngine(), step, {"step": step})
    (checkpointer.dir / "step-00001234").mkdir()
    (checkpointer.dir / "step-00001234" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert resolve_resume("auto", checkpointer.dir, world_size=1) == (checkpointer.dir, "step-00001000")
    checkpointer.save(FakeEngine(), 1500, {"step": 1500})
    assert sorted(p.name for p in checkpointer.dir.glob("step-*")) == ["step-00001000", "step-00001500"]


class ZeroEngine(FakeEngine):
    """Writes what `ranks` ranks of ZeRO leave in a shared folder: one optimizer partition file each."""

    def __init__(self, ranks: int):
        super().__init__()
        self.ranks = self.world_size = ranks

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(exist_ok=True)
        torch.save(client_state, folder / "mp_rank_00_model_states.pt")
        for rank in range(self.ranks):
            torch.save(torch.zeros(8), folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def test_a_resume_on_another_world_size_is_refused_before_loading(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_total_limit=None, rank=0)
    checkpointer.save(ZeroEngine(ranks=2), 2, {"step": 2}, rank_state={"rng": 0})  # rank-0-state.pt: no rank 1's
    folder = checkpointer.dir / "step-00000002"
    assert saved_world_size(folder) == 2
    assert resolve_resume("auto", checkpointer.dir, world_size=2) == (checkpointer.dir, "step-00000002")
    for world_size in (1, 3):
        with pytest.raises(ResumeWorldSizeError) as info:
            resolve_resume(str(folder), tmp_path, "--resume_from_checkpoint", world_size=world_size)
        assert str(info.value) == (f"--resume_from_checkpoint {folder}: written by 2 ranks, this run has "
                                   f"{world_size}; a checkpoint resumes only on the number of ranks that wrote it "
                                   "(ZeRO splits the optimizer state and the data by rank)")
    checkpointer.save(FakeEngine(), 4, {"step": 4}, rank_state={"rng": 0})  # ZeRO stage 0: rank files alone
    assert saved_world_size(checkpointer.dir / "step-00000004") == 1
    checkpointer.save(FakeEngine(), 6, {"step": 6})  # no file of one rank's own: ranks.json tells
    assert saved_world_size(checkpointer.dir / "step-00000006") == 1
    with pytest.raises(ResumeWorldSizeError, match="written by 1 rank, this run has 3"):
        resolve_resume("auto", checkpointer.dir, world_size=3)
    old = checkpointer.dir / "step-00000006"  # as saved before ranks.json was: not known, not checked
    (old / RANKS).unlink()
    (old / FILES).write_text(json.dumps({k: v for k, v in json.loads((old / FILES).read_text()).items() if k != RANKS}))
    assert saved_world_size(checkpointer.dir / "step-00000006") is None
    assert resolve_resume("auto", checkpointer.dir, world_size=3) == (checkpointer.dir, "step-00000006")


def test_a_resume_checks_the_checkpoints_files(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_total_limit=None, rank=0)
    for step in (2, 4):
        checkpointer.save(FakeEngine(), step, {"step": step})
    assert resolve_resume("auto", checkpointer.dir, world_size=1) == (checkpointer.dir, "step-00000004")
    assert resolve_resume(str(checkpointer.dir), tmp_path, world_size=1) == (checkpointer.dir, "step-00000004")
    assert resolve_resume(str(checkpointer.dir / "step-00000002"), tmp_path, world_size=1) == (checkpointer.dir,
                                                                                              "step-00000002")
    assert resolve_resume("auto", tmp_path / "fresh", world_size=1) is None
    assert resolve_resume(None, checkpointer.dir, world_size=1) is None
    with pytest.raises(FileNotFoundError, match="--resume /nowhere: neither a checkpoint folder"):
        resolve_resume("/nowhere", checkpointer.dir, world_size=1)
    unfinished = checkpointer.dir / "step-00000003"  # older than `latest`, never finished
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match=f"--resume {unfinished}: an incomplete checkpoint .no {FILES}"):
        resolve_resume(str(unfinished), checkpointer.dir, world_size=1)
    optim = checkpointer.dir / "step-00000002" / "optim_states.pt"
    size = optim.stat().st_size
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(FileNotFoundError, match=f"step-00000002: an incomplete checkpoint .optim_states.pt: "
                                                f"100 bytes, {size} written"):
        resolve_resume(str(optim.parent), checkpointer.dir, "--resume_from_checkpoint", world_size=1)
    (checkpointer.dir / "step-00000004" / "optim_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"step-00000004: an incomplete checkpoint .optim_states.pt: missing"):
        resolve_resume("auto", checkpointer.dir, world_size=1)


def test_a_metrics_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "loss": 2.3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        keep_steps_up_to(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'
    assert [r.getMessage() for r in caplog.records] == [
        f'{path}: dropping its last line, cut short by a crash: {{"step": 4, "lo']
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON line"):
        keep_steps_up_to(path, 2)


def _logged_save_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of a real 2-rank DeepSpeed save (ZeRO-2, CPU, gloo) that logs, in order, each file it writes
    (torch.save, which DeepSpeed's checkpoint engine calls), each fsync (the path of its descriptor) and the
    all-gather after which `latest` may move."""
    import deepspeed
    import torch.distributed as dist

    from common.distributed import init_distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    init_distributed(120)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    events = []
    save, fsync, gather = torch.save, os.fsync, dist.all_gather_object

    def logged_save(obj, path, *args, **kwargs):
        events.append(("write", str(path)))
        return save(obj, path, *args, **kwargs)

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def logged_gather(*args, **kwargs):
        events.append(("gather", ""))
        return gather(*args, **kwargs)

    torch.save, os.fsync, dist.all_gather_object = logged_save, logged_fsync, logged_gather
    Checkpointer(Path(out) / "checkpoints", save_total_limit=None, rank=rank).save(engine, 1, {"step": 1},
                                                                                  rank_state={"rank": rank})
    torch.save, os.fsync, dist.all_gather_object = save, fsync, gather
    (Path(out) / f"events-{rank}.json").write_text(json.dumps(events))
    dist.destroy_process_group()


def test_every_rank_fsyncs_its_files_and_the_folder_before_latest_moves(tmp_path, monkeypatch):
    """Each rank's checkpoint files and the step folder reach storage before the all-gather that lets rank 0 move
    `latest` (on Lustre or NFS a node lost after `latest` moved could otherwise take its part of the checkpoint)."""
    import socket

    import torch.multiprocessing as mp

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_logged_save_worker, args=(port, str(tmp_path)), nprocs=2)
    folder = tmp_path / "checkpoints" / "step-00000001"
    written = set()
    for rank in (0, 1):
        events = json.loads((tmp_path / f"events-{rank}.json").read_text())
        before = events[:[kind for kind, _ in events].index("gather")]
        mine = {path for kind, path in before if kind == "write" and Path(path).parent == folder}
        last_write = {path: i for i, (kind, path) in enumerate(before) if kind == "write"}
        synced = {path for i, (kind, path) in enumerate(before) if kind == "fsync" and i > last_write.get(path, -1)}
        assert mine and mine | {str(folder)} <= synced, (rank, events)  # each file after its last write
        written |= mine
    assert written == {str(p) for p in folder.iterdir() if p.name not in (FILES, RANKS)}  # both ranks', all
    assert saved_world_size(folder) == 2  # DeepSpeed's names, as a resume counts them
    assert {p.name for p in folder.iterdir()} >= {"rank-0-state.pt", "rank-1-state.pt"}
