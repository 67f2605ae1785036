"""One way to join the process group for every DeepSpeed stage: deepspeed/torchrun variables, else SLURM's."""
from __future__ import annotations

import datetime
import os


class DistributedSetupError(ValueError):
    """The environment cannot form the process group (e.g. several ranks without a rendezvous address)."""


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """(rank, local_rank, world_size); starts DeepSpeed's process group, whose collectives give up after
    `timeout_s` (--ddp_timeout). A plain `python main.py` is a world of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun, one task per process
        env["RANK"], env["LOCAL_RANK"] = env["SLURM_PROCID"], env["SLURM_LOCALID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    rank, world_size = int(env.setdefault("RANK", "0")), int(env.setdefault("WORLD_SIZE", "1"))
    local_rank = int(env.setdefault("LOCAL_RANK", "0"))
    if world_size > 1 and not ("MASTER_ADDR" in env and "MASTER_PORT" in env):
        raise DistributedSetupError(f"world size {world_size} needs MASTER_ADDR and MASTER_PORT in the environment")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    # a world of one: a per-process port, so single-process runs side by side do not collide
    env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    elif env.get("DUPMAE_CPU_SHM_COMM", "0") != "1":
        # DeepSpeed's shared-memory all-reduce for CPU is a C++ op compiled at the first init (minutes on a small
        # machine, and rebuilt whenever another environment built it last); plain gloo is enough for CPU runs.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed's engine makes its own groups (ZeRO's data-parallel one: a clone of the world) with torch's default
    # timeout, 30 min, whatever the world group has; so the default itself must change before they exist.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False,
                               timeout=timeout)
    return rank, local_rank, world_size
