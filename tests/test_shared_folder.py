"""common/shared_folder.py on its own: two gloo ranks on one machine, once with one folder, once each with its own
(what node-local storage looks like to the ranks). The multi-node run is tests/test_multinode.py (SLURM)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.multiprocessing

from common.distributed import DistributedSetupError
from common.shared_folder import check_shared_folder


def _worker(rank: int, port: int, folders: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        check_shared_folder(folders[rank], rank, 2)
        result = "ok"
    except DistributedSetupError as exc:
        result = str(exc)
    Path(out, f"rank-{rank}.txt").write_text(result)
    dist.destroy_process_group()


def _run(folders: list[Path], out: Path) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, [str(f) for f in folders], str(out)), nprocs=2, join=True)
    return [(out / f"rank-{rank}.txt").read_text() for rank in (0, 1)]


@pytest.mark.slow
def test_a_folder_the_ranks_do_not_share_is_one_error_on_every_rank(tmp_path):
    shared = tmp_path / "shared"
    assert _run([shared, shared], tmp_path) == ["ok", "ok"]
    assert list(shared.iterdir()) == []  # the check leaves nothing behind
    host = socket.gethostname()
    lines = _run([tmp_path / "node0", tmp_path / "node1"], tmp_path)
    for rank, line in enumerate(lines):
        assert line == (f"output folder {tmp_path / f'node{rank}'} is not shared by all ranks: rank 0 ({host}) cannot "
                        f"see the files of rank(s) 1 ({host}); rank 1 ({host}) cannot see the files of rank(s) 0 "
                        f"({host}); put it on a filesystem that every node mounts")
