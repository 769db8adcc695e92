#!/usr/bin/env python3
"""Measure a worker's memory and CPU under clients that never read (issue 9, F).

Starts a flood backend (every accepted connection is sent ``--bytes`` bytes,
and nothing is read), a real ``prefork-proxy`` with one worker in front of it,
and ``--connections`` clients that connect and never read.  Reports the
worker's RSS before, at its peak while stalled, after settling, its CPU use
while stalled, and its RSS a few seconds after every client closed::

    .venv/bin/python scripts/stalled_readers.py --relay copy --connections 1000
    .venv/bin/python scripts/stalled_readers.py --relay splice --budget-mb 64

Everything is on loopback and bounded: connects, the settle wait and the
after-close wait each have a deadline.  ``--serve-flood BYTES`` runs only the
flood backend (used by tests/integration/test_relay_faults.py): it prints
``listening PORT`` and serves until killed.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test helpers, also from a fresh clone
from support import BackendProcess, ProxyProcess, cpu_seconds, rss_kib  # noqa: E402

CHUNK = memoryview(bytes(1 << 20))


def serve_flood(total: int) -> None:
    """Send ``total`` bytes to each accepted client, read nothing, keep it open."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    left: Dict[socket.socket, int] = {}
    print(f"listening {listener.getsockname()[1]}", flush=True)
    while True:
        for key, _ in selector.select(1.0):
            if key.fileobj is listener:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    left[sock] = total
                    selector.register(sock, selectors.EVENT_WRITE)
                continue
            sock = key.fileobj  # type: ignore[assignment]
            try:
                while left[sock]:
                    left[sock] -= sock.send(CHUNK[:min(left[sock], len(CHUNK))])
            except BlockingIOError:
                continue
            except OSError:
                pass
            selector.unregister(sock)  # all sent (or gone): keep it open, idle
            if left[sock]:
                sock.close()
                del left[sock]


def start_flood(total: int) -> BackendProcess:
    """This script's flood backend in its own process (``--serve-flood``)."""
    return BackendProcess(command=[sys.executable, __file__, "--serve-flood", str(total)])


def measure(relay: str, connections: int, total: int, budget_mb: Optional[int],
            settle_s: float = 60.0, after_s: float = 5.0) -> Dict[str, float]:
    """Run one measurement; return the figures (MiB, percent, seconds)."""
    flood = start_flood(total)
    port = flood.port
    workdir = Path(tempfile.mkdtemp(prefix="stalled-readers-"))
    config = workdir / "proxy.toml"
    budget_line = f"buffer_budget_mb = {budget_mb}\n" if budget_mb else ""
    config.write_text(f"[server]\nworkers = 1\nthreads = 1\nrelay = \"{relay}\"\n{budget_line}\n"
                      f"[[tcp_proxy]]\nbind = \"127.0.0.1:0\"\n"
                      f"backends = [\"127.0.0.1:{port}\"]\n")
    proxy = ProxyProcess(["start", "--config", str(config)], workdir / "proxy.log",
                         wait_ready=False, cwd=ROOT)
    clients: List[socket.socket] = []
    try:
        proxy.wait_ready(20)
        proxy_port = proxy.port()
        (worker,) = proxy.wait_workers(1, 20)
        time.sleep(0.5)  # let the worker finish booting before the first figure
        figures: Dict[str, float] = {"rss_start": rss_kib(worker) / 1024}
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
            clients.append(sock)  # and never read
        # Settled: nothing moves any more: RSS unchanged (within 64 KiB) and the
        # worker used under 1 % of a CPU, for two seconds in a row; bounded by
        # settle_s (a worker that spins never settles, and the figures show it).
        peak, last_rss, last_cpu, quiet_since = 0.0, -1.0, cpu_seconds(worker), None
        started = time.monotonic()
        deadline = started + settle_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            rss, cpu = rss_kib(worker) / 1024, cpu_seconds(worker)
            peak = max(peak, rss)
            quiet = abs(rss - last_rss) <= 1 / 16 and cpu - last_cpu <= 0.005
            last_rss, last_cpu = rss, cpu
            if not quiet:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 2.0:
                break
        figures["settle_s"] = time.monotonic() - started
        figures["rss_peak"] = peak
        figures["rss_stalled"] = rss_kib(worker) / 1024
        cpu, wall = cpu_seconds(worker), time.monotonic()
        time.sleep(3.0)
        figures["cpu_stalled_pct"] = 100 * (cpu_seconds(worker) - cpu) / (time.monotonic() - wall)
        for sock in clients:
            sock.close()
        clients.clear()
        time.sleep(after_s)
        figures["rss_after_close"] = rss_kib(worker) / 1024
        return figures
    finally:
        for sock in clients:
            sock.close()
        proxy.stop(20)
        flood.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relay", choices=["splice", "copy"], default="copy")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--bytes", type=int, default=8 << 20, help="sent by the backend to each")
    parser.add_argument("--budget-mb", type=int, default=None,
                        help="[server] buffer_budget_mb (default: the proxy's default)")
    parser.add_argument("--serve-flood", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_flood is not None:
        serve_flood(args.serve_flood)
        return
    if not 1 <= args.connections <= 5000:
        parser.error("--connections: between 1 and 5000 (each costs 4 descriptors here)")
    figures = measure(args.relay, args.connections, args.bytes, args.budget_mb)
    print(f"relay={args.relay} connections={args.connections} bytes={args.bytes} "
          f"budget_mb={args.budget_mb or 'default'}: worker RSS start "
          f"{figures['rss_start']:.1f} MiB, peak {figures['rss_peak']:.1f}, stalled "
          f"{figures['rss_stalled']:.1f} (settled in {figures['settle_s']:.0f} s), "
          f"5 s after close {figures['rss_after_close']:.1f}; "
          f"CPU while stalled {figures['cpu_stalled_pct']:.1f} %")


if __name__ == "__main__":
    main()
