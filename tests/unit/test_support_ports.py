"""tests/support.free_port: each xdist process its own ports, none the kernel hands out."""
from __future__ import annotations

import socket

import support


def _block(monkeypatch, worker: str, count: str) -> range:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    return support._port_block()


def test_each_xdist_process_has_a_disjoint_block_below_the_ephemeral_range(monkeypatch):
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    first, second = _block(monkeypatch, "gw0", "2"), _block(monkeypatch, "gw1", "2")
    assert first and second and not set(first) & set(second)
    assert first.start >= support.PORT_POOL_START
    assert max(first.stop, second.stop) <= ephemeral_low


def test_free_port_gives_a_bindable_port_of_its_block_and_then_another():
    first, second = support.free_port(), support.free_port()
    assert first != second
    for port in (first, second):
        assert port in support._PORT_BLOCK
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))
