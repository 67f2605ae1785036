"""common/distributed.py's rendezvous line: the interface and address each rank's collectives use, on its own."""
from __future__ import annotations

import socket

import pytest

from common.distributed import DistributedSetupError, interface_addresses, named_interface, rendezvous_line


@pytest.fixture
def rendezvous_env(monkeypatch):
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    return monkeypatch


def test_the_interface_named_by_gloo_socket_ifname_is_the_one_reported(rendezvous_env):
    assert interface_addresses()["lo"] == "127.0.0.1"
    rendezvous_env.setenv("GLOO_SOCKET_IFNAME", "lo")
    host = socket.gethostname()
    assert rendezvous_line(1, "gloo") == (f"rank 1 on {host}: rendezvous 127.0.0.1:29999 (127.0.0.1), gloo on lo "
                                          f"127.0.0.1 (GLOO_SOCKET_IFNAME)")


def test_an_interface_that_does_not_exist_is_one_error_naming_it(rendezvous_env):
    rendezvous_env.setenv("NCCL_SOCKET_IFNAME", "ib7")
    with pytest.raises(DistributedSetupError, match=r"^NCCL_SOCKET_IFNAME=ib7: no interface of that name .* it has "
                                                    r".*\blo\b"):
        rendezvous_line(0, "nccl")
    rendezvous_env.setenv("GLOO_SOCKET_IFNAME", "ib7")  # gloo reads its own variable
    with pytest.raises(DistributedSetupError, match="GLOO_SOCKET_IFNAME=ib7"):
        rendezvous_line(0, "gloo")


def test_a_hostname_on_loopback_is_flagged_when_rank_0_is_elsewhere(rendezvous_env):
    """What made the second node hang in the trial of issue 34: gloo binds to what the hostname resolves to."""
    rendezvous_env.setattr(socket, "gethostname", lambda: "localhost")
    rendezvous_env.setenv("MASTER_ADDR", "10.213.0.11")
    line = rendezvous_line(1, "gloo")
    assert "gloo on lo 127.0.0.1 (the hostname's address, GLOO_SOCKET_IFNAME unset)" in line
    assert line.endswith("ranks on other nodes cannot reach a loopback address: set GLOO_SOCKET_IFNAME")
    rendezvous_env.setenv("MASTER_ADDR", "127.0.0.1")  # one node: loopback is right
    assert "cannot reach" not in rendezvous_line(1, "gloo")


def test_nccl_reads_its_variable_as_a_prefix_or_an_exact_name_with_equals(rendezvous_env):
    """NCCL_SOCKET_IFNAME=l is every l* interface and =lo exactly lo (NCCL's own reading); both used to be refused
    as no interface of that name. gloo's variable names interfaces exactly."""
    for value in ("l", "lo", "=lo"):
        rendezvous_env.setenv("NCCL_SOCKET_IFNAME", value)
        assert rendezvous_line(0, "nccl").endswith("nccl on lo 127.0.0.1 (NCCL_SOCKET_IFNAME)"), value
    rendezvous_env.setenv("NCCL_SOCKET_IFNAME", "=l")
    with pytest.raises(DistributedSetupError, match=r"^NCCL_SOCKET_IFNAME==l: no interface of that name with"):
        rendezvous_line(0, "nccl")
    rendezvous_env.setenv("GLOO_SOCKET_IFNAME", "l")
    with pytest.raises(DistributedSetupError, match=r"^GLOO_SOCKET_IFNAME=l: no interface of that name with"):
        rendezvous_line(0, "gloo")
    addresses = {"eth1": "10.0.0.2", "eth0": "10.0.0.1", "ib0": "10.1.0.1"}
    assert [named_interface(w, addresses, prefix=True) for w in ("eth", "ib", "=eth", "=eth1", "wl")] == [
        "eth0", "ib0", None, "eth1", None]
    assert [named_interface(w, addresses, prefix=False) for w in ("eth", "eth1", "=eth1")] == [None, "eth1", None]
