"""Balancing algorithms through the real proxy: weights, least_conn, source_hash.

State is global across workers (shared memory), so every test runs several
workers and the figures hold whichever worker accepts.  ``PREFORK_PROXY_FIGURES=1``
runs the issue's sizes and prints the figures (``pytest -s``).
"""

from __future__ import annotations

import collections
import re
import socket
import subprocess
import sys
from typing import Dict, List, Optional

from backend_clients import FIGURES, figure, run_clients, tag
from support import wait_for, write_config


def _config(path, backends: str, listener: str, workers: int, pidfile: str = "") -> str:
    pid_line = f'pidfile = "{pidfile}"' if pidfile else ""
    return str(write_config(path, f"""
[server]
workers = {workers}
{pid_line}

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = {backends}
{listener}
"""))


def _active_counts(pidfile: str) -> Optional[Dict[str, int]]:
    """Active connections per backend, from ``prefork-proxy status``."""
    result = subprocess.run([sys.executable, "-m", "prefork_proxy", "status", "--pidfile",
                             pidfile], capture_output=True, text=True, timeout=30)
    counts = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if line.startswith("127.0.0.1:0 ") and len(fields) >= 5:
            counts[fields[1]] = int(fields[3])
    return counts or None


def test_weights_1_to_3_split_25_75_through_8_workers(backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    config = _config(tmp_path / "p.toml",
                     f'["{a.address}", {{ address = "{b.address}", weight = 3 }}]', "", 8)
    proxy = proxy_factory("start", "--config", config, "--log-level", "debug")
    proxy.wait_workers(8)
    total = 10_000 if FIGURES else 2_000
    names, failures, _ = run_clients(proxy.port(), total)
    share = names["A"] / total
    figure(f"weights 1:3 over {total} connections through 8 workers: A {names['A']} "
           f"({share:.2%}), B {names['B']} ({1 - share:.2%}), {failures} failures")
    assert failures == 0 and abs(share - 0.25) <= 0.01
    serving = set(re.findall(r"\[(\d+)\] DEBUG client \S+ connected", proxy.log))
    assert len(serving) >= 3, "too few workers accepted for the split to prove it is global"


def _short(port: int) -> str:
    """A short connection: read the tag, end it, wait until the proxy has closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        name = sock.makefile("rb").readline()
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    return name.decode().strip()


def test_least_conn_keeps_active_counts_within_one(backend_factory, proxy_factory, tmp_path):
    backends = [backend_factory("tag", name) for name in "ABC"]
    pidfile = str(tmp_path / "p.pid")
    config = _config(tmp_path / "p.toml", "[" + ", ".join(f'"{b.address}"' for b in backends)
                     + "]", 'balance = "least_conn"', 4, pidfile)
    proxy = proxy_factory("start", "--config", config)
    proxy.wait_workers(4)
    port = proxy.port()
    held: List[socket.socket] = []
    held_names: List[str] = []
    rounds = 30

    def settled() -> bool:
        """Status counts exactly the held connections: every short one has been released.

        A short connection's count is released just after its client sees EOF, so
        without this wait a pick could see a stale count on a loaded machine.
        """
        counts = _active_counts(pidfile)
        return bool(counts) and sum(counts.values()) == len(held)

    for _ in range(rounds // 6):  # long connections, then short ones, and again
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(sock)
            held_names.append(sock.makefile("rb").readline().decode().strip())
        for _ in range(6):
            _short(port)
        wait_for(settled, timeout=15, message="the short connections to be released")
    counts = collections.Counter(held_names)
    assert max(counts.values()) - min(counts.values()) <= 1, counts

    # Uneven departures: most of A's connections end; new ones refill A first.
    leaving = [i for i, name in enumerate(held_names) if name == "A"][:8]
    for i in leaving:
        held[i].close()
    stay = [i for i in range(rounds) if i not in leaving]
    held = [held[i] for i in stay]
    held_names = [held_names[i] for i in stay]
    wait_for(lambda: (_active_counts(pidfile) or {}).get(backends[0].address) == counts["A"] - 8,
             timeout=15, message="the proxy to count A's closed connections")
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(sock)
        held_names.append(sock.makefile("rb").readline().decode().strip())
    counts = collections.Counter(held_names)
    active = wait_for(lambda: (lambda c: c if c and sum(c.values()) == rounds else None)(
        _active_counts(pidfile)), timeout=15, message="status to show every held connection")
    figure(f"least_conn (4 workers, long connections mixed with short ones): held "
           f"{dict(sorted(counts.items()))}; status active counts {sorted(active.values())}")
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert max(active.values()) - min(active.values()) <= 1, active
    for sock in held:
        sock.close()


def test_source_hash_is_stable_and_losing_a_backend_moves_only_its_clients(
        backend_factory, proxy_factory, tmp_path):
    backends = [backend_factory("tag", name) for name in "ABCD"]
    config = _config(tmp_path / "p.toml", "[" + ", ".join(f'"{b.address}"' for b in backends)
                     + "]", 'balance = "source_hash"\nfall = 1\nfail_timeout_ms = 60000', 2)
    proxy = proxy_factory("start", "--config", config)
    count = 400 if FIGURES else 60
    clients = [f"127.0.{i // 200}.{i % 200 + 10}" for i in range(count)]
    first = {client: tag(proxy.port(), source=client) for client in clients}
    again = {client: tag(proxy.port(), source=client) for client in clients}
    assert again == first, "the same client address landed on another backend"
    spread = collections.Counter(first.values())
    assert set(spread) == set("ABCD"), spread

    backends[3].stop()  # D goes away: its clients fail over to their second choice
    after = {client: tag(proxy.port(), source=client) for client in clients}
    moved = {client for client in clients if after[client] != first[client]}
    figure(f"source_hash over {count} client addresses, 4 backends {dict(sorted(spread.items()))}"
           f": stable on repeat; removing D moved {len(moved)} ({len(moved) / count:.1%}), "
           f"exactly D's {spread['D']} clients: {moved == {c for c in clients if first[c] == 'D'}}")
    assert moved == {client for client in clients if first[client] == "D"}
    assert "D" not in after.values()
