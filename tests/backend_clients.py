"""Clients and fake backends for the failover and balancing tests (tests/integration).

``tag`` connects through the proxy (optionally from another 127.x source
address) and returns the backend's name; ``run_clients`` makes many such
connections from a few threads, counting names, failures and latencies
(ports and the blackhole backend are in support.py).  ``figure`` prints a
measured number for the report (``pytest -s``); ``PREFORK_PROXY_FIGURES=1``
asks for the issue's sizes instead of the lean defaults.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
from typing import List, Tuple

FIGURES = os.environ.get("PREFORK_PROXY_FIGURES") == "1"


def figure(text: str) -> None:
    """A measured number, for the report (shown with pytest -s)."""
    print(f"FIGURE {text}", file=sys.stderr)


def tag(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """Connect through the proxy, read the backend's name line, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        line = sock.makefile("rb").readline().decode().strip()
    if not line:
        raise ConnectionError("closed by the proxy before the backend's tag")
    return line


def run_clients(port: int, total: int, threads: int = 4) -> Tuple[collections.Counter, int,
                                                                      List[float]]:
    """``total`` connections from ``threads`` threads: names seen, failures, latencies."""
    names: collections.Counter = collections.Counter()
    latencies: List[float] = []
    failures = [0]
    lock = threading.Lock()
    per_thread = [total // threads + (1 if i < total % threads else 0) for i in range(threads)]

    def client(count: int) -> None:
        for _ in range(count):
            started = time.monotonic()
            try:
                name = tag(port)
            except OSError:
                with lock:
                    failures[0] += 1
                continue
            with lock:
                names[name] += 1
                latencies.append(time.monotonic() - started)

    workers = [threading.Thread(target=client, args=(n,)) for n in per_thread]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(100)
    return names, failures[0], latencies
