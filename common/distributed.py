"""One way to join the process group for every DeepSpeed stage: deepspeed/torchrun variables, else SLURM's.

The rendezvous is env://: rank 0 listens on MASTER_ADDR:MASTER_PORT (slurm/lib.sh sets them to the allocation's
first node and a port from the job id), every rank connects there. The collectives then run over the address each
rank picks for itself: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME's interface when set; otherwise gloo binds to the
address its hostname resolves to (127.0.0.1 if that is all it resolves to, which other nodes cannot reach), and
NCCL picks an interface itself (InfiniBand first, then any but lo and docker). Each rank logs that choice.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import socket
import struct

logger = logging.getLogger(__name__)
_SIOCGIFADDR = 0x8915  # ioctl: an interface's IPv4 address


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
    if world_size > 1:
        logger.info("%s", rendezvous_line(rank, accelerator.communication_backend_name()))
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


def end_distributed() -> None:
    """Destroys the process group if this process joined one; every entry point calls it on every return. A gloo
    group left to interpreter shutdown can abort the process there (SIGABRT: "terminate called without an active
    exception"), and the run's own exit code (2, 3, 4, 5) becomes 134 or srun's "Aborted"."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def interface_addresses() -> dict[str, str]:
    """{interface name: IPv4 address} of the interfaces that have one."""
    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            found[name] = socket.inet_ntoa(packed[20:24])
    return found


def named_interface(wanted: str, addresses: dict[str, str], prefix: bool) -> str | None:
    """The interface a *_SOCKET_IFNAME entry names, among those with an address (None: none). NCCL reads an entry
    as a name prefix (`ib`: the first ib* interface) and `=NAME` as an exact name; gloo reads exact names."""
    if prefix and wanted.startswith("="):
        wanted, prefix = wanted[1:], False
    if not prefix:
        return wanted if wanted in addresses else None
    return next((name for name in sorted(addresses) if name.startswith(wanted)), None)


def rendezvous_line(rank: int, backend: str) -> str:
    """Where this rank meets the others and the interface and address its collectives use, in one line; a
    MASTER_ADDR that does not resolve here is a DistributedSetupError (the rendezvous would hang or fail later)."""
    env, host = os.environ, socket.gethostname()
    master = env["MASTER_ADDR"]
    try:
        master_ip = socket.gethostbyname(master)
    except OSError as exc:
        raise DistributedSetupError(f"MASTER_ADDR {master} does not resolve on {host} (rank {rank}): {exc}") from None
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    addresses = interface_addresses()
    wanted = env.get(variable, "").split(",")[0]
    if wanted and not wanted.startswith("^"):
        prefix = backend == "nccl" and not wanted.startswith("=")
        name = named_interface(wanted, addresses, prefix=backend == "nccl")
        if name is None:
            kind = "that name or a name starting with it" if prefix else "that name"
            raise DistributedSetupError(f"{variable}={wanted}: no interface of {kind} with an IPv4 address on "
                                        f"{host} (rank {rank}); it has {', '.join(sorted(addresses)) or 'none'}")
        address, how = addresses[name], variable
    else:
        if backend == "nccl":  # NCCL picks itself (NCCL_DEBUG=INFO says which); report the route to rank 0
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((master_ip, int(env["MASTER_PORT"])))
                address, how = probe.getsockname()[0], f"route to MASTER_ADDR; NCCL may choose another, {variable} unset"
        else:
            try:
                address, how = socket.gethostbyname(host), f"the hostname's address, {variable} unset"
            except OSError:
                address, how = "127.0.0.1", f"loopback: the hostname does not resolve, {variable} unset"
        name = next((n for n, a in addresses.items() if a == address), "?")
    line = (f"rank {rank} on {host}: rendezvous {master}:{env['MASTER_PORT']} ({master_ip}), {backend} on "
            f"{name} {address} ({how})")
    if ipaddress.ip_address(address).is_loopback and not ipaddress.ip_address(master_ip).is_loopback:
        line += f"; ranks on other nodes cannot reach a loopback address: set {variable}"
    return line
