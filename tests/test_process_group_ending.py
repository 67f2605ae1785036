"""Both entry points end the process group on an error return, not only after a finished run.

A gloo group left to interpreter shutdown can abort the process there ("terminate called without an active
exception"): a 2-node pre-training job refused for an unshared output folder once ended with srun's "task 1:
Aborted" instead of exit code 2. Here 2 ranks on this machine each get their own output folder (node-local storage),
which both stages refuse after the group is formed; each rank reports its exit code and whether its group still
exists when `main` has returned.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing

from test_pretrain_train import TINY, _free_port, shard_dir, tokenizer  # noqa: F401  fixtures


def _worker(rank: int, port: int, stage: str, argv_by_rank: list[list[str]], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    if stage == "pretrain":
        from pretrain.main import main
    else:
        from finetune.main import main
    code = main(argv_by_rank[rank])
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"code": code, "group_left": dist.is_initialized()}))


def _run(stage: str, argv_by_rank: list[list[str]], out: Path) -> list[dict]:
    torch.multiprocessing.spawn(_worker, args=(_free_port(), stage, argv_by_rank, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_pretrain_refused_after_the_rendezvous_exits_2_with_no_group_left(tmp_path, shard_dir, minilm_path):
    argv = [["--data_dir", str(shard_dir), "--model_name_or_path", minilm_path, "--config_overrides", TINY,
             "--output_dir", str(tmp_path / f"node{rank}"), "--max_steps", "2"] for rank in (0, 1)]
    assert _run("pretrain", argv, tmp_path) == [{"code": 2, "group_left": False}] * 2


@pytest.mark.slow
def test_finetune_refused_after_the_rendezvous_exits_2_with_no_group_left(tmp_path, minilm_path):
    argv = [["--model_name_or_path", minilm_path, "--data_dir", str(tmp_path / "beir"), "--output_dir",
             str(tmp_path / f"node{rank}"), "--deepspeed", "ds_configs/finetune_cpu.json"] for rank in (0, 1)]
    assert _run("finetune", argv, tmp_path) == [{"code": 2, "group_left": False}] * 2
