"""The foundation's figures: 1 GiB through the proxy vs direct, and a worker's idle cost.

Usage: ``.venv/bin/python scripts/transfer_figures.py [--gib 1] [--repeats 3] [--idle 2000]``

- Bulk: a sink process on 127.0.0.1 counts bytes; a sender process pushes
  ``--gib`` GiB straight to it (``direct``) or through prefork-proxy with one
  worker (``splice``, ``copy``).  Modes are interleaved per repeat and the
  median is reported, with the CPU seconds (user + system) the proxy's
  processes spent, read from /proc before and after.
- Idle: one worker, ``--idle`` connections opened through it and each checked
  with a round trip; its RSS, PSS and thread count before and after.

Loopback only; every loop is bounded.  Sender and sink are separate processes
so neither shares a GIL with the other.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from bench_lib.procfs import tree_cpu_seconds  # noqa: E402  (the benchmark's /proc reader)
from support import ProxyProcess  # noqa: E402  (starts the CLI, waits for its ready line)

CHUNK = 1 << 20


def sink(port_queue) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    buffer = bytearray(CHUNK)
    while True:
        conn, _ = server.accept()
        total = 0
        while True:
            n = conn.recv_into(buffer)
            if not n:
                break
            total += n
        conn.sendall(str(total).encode())
        conn.close()


def send(port: int, total: int) -> float:
    """Send ``total`` bytes to 127.0.0.1:port; return seconds until the sink confirmed them."""
    payload = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(payload)
            sent += CHUNK
        sock.shutdown(socket.SHUT_WR)
        confirmed = int(sock.recv(64))
        elapsed = time.perf_counter() - start
    assert confirmed == total, (confirmed, total)
    return elapsed


def start_proxy(backend_port: int, relay: str) -> Tuple[ProxyProcess, int]:
    """The proxy (1 worker, 2 relay threads) in front of the backend, its log in a temp dir."""
    log = Path(tempfile.mkdtemp(prefix="transfer-figures-")) / f"proxy-{relay}.log"
    proxy = ProxyProcess(["start", "--bind", "127.0.0.1:0", "--backend",
                          f"127.0.0.1:{backend_port}", "--workers", "1", "--threads", "2",
                          "--relay", relay], log)
    return proxy, proxy.port()


def workers_of(pid: int) -> List[int]:
    pids: List[int] = []
    deadline = time.monotonic() + 10
    while not pids and time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    return pids


def memory(pid: int) -> Dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "Threads:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                values["Pss"] = int(line.split()[1])
    return values


def bulk(gib: float, repeats: int) -> None:
    context = get_context("fork")
    queue = context.Queue()
    sink_process = context.Process(target=sink, args=(queue,), daemon=True)
    sink_process.start()
    sink_port = queue.get(timeout=10)
    total = int(gib * (1 << 30)) // CHUNK * CHUNK
    samples: Dict[str, List[tuple]] = {"direct": [], "splice": [], "copy": []}
    proxies = {mode: start_proxy(sink_port, mode) for mode in ("splice", "copy")}
    try:
        for _ in range(repeats):
            for mode in samples:
                if mode == "direct":
                    samples[mode].append((send(sink_port, total), 0.0))
                    continue
                proxy, port = proxies[mode]
                cpu_before = tree_cpu_seconds(proxy.pid)
                elapsed = send(port, total)
                samples[mode].append((elapsed, tree_cpu_seconds(proxy.pid) - cpu_before))
    finally:
        for proxy, _ in proxies.values():
            proxy.stop(30)
        sink_process.terminate()
    direct = statistics.median(t for t, _ in samples["direct"])
    print(f"bulk: {total / (1 << 30):.2f} GiB one way over 127.0.0.1, median of {repeats}")
    print(f"{'path':8} {'GiB/s':>7} {'vs direct':>10} {'proxy CPU s':>12}")
    for mode, values in samples.items():
        seconds = statistics.median(t for t, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"{mode:8} {total / seconds / (1 << 30):7.2f} {direct / seconds:10.2f} "
              f"{cpu:12.2f}" if mode != "direct" else
              f"{mode:8} {total / seconds / (1 << 30):7.2f} {1.0:10.2f} {'-':>12}")


def idle(count: int) -> None:
    context = get_context("fork")
    queue = context.Queue()
    sink_process = context.Process(target=_echo, args=(queue,), daemon=True)
    sink_process.start()
    backend_port = queue.get(timeout=10)
    proxy, port = start_proxy(backend_port, "auto")
    clients = []
    try:
        [worker] = workers_of(proxy.pid)
        deadline = time.monotonic() + 10
        while memory(worker)["Threads"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # until its main thread and 2 relay threads run
        before = memory(worker)
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
            clients.append(sock)
        after = memory(worker)
    finally:
        for sock in clients:
            sock.close()
        proxy.stop(30)
        sink_process.terminate()
    print(f"idle: one worker holding {count} connections")
    print(f"  RSS {before['VmRSS']} KiB -> {after['VmRSS']} KiB "
          f"({(after['VmRSS'] - before['VmRSS']) / count:.2f} KiB per connection)")
    print(f"  PSS {before['Pss']} KiB -> {after['Pss']} KiB "
          f"({(after['Pss'] - before['Pss']) / count:.2f} KiB per connection)")
    print(f"  threads {before['Threads']} -> {after['Threads']}")


def _echo(port_queue) -> None:
    import selectors

    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    server.setblocking(False)
    port_queue.put(server.getsockname()[1])
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                try:
                    conn, _ = server.accept()
                    selector.register(conn, selectors.EVENT_READ)
                except BlockingIOError:
                    pass
                continue
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if data:
                key.fileobj.sendall(data)
            else:
                selector.unregister(key.fileobj)
                key.fileobj.close()


def main() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle", type=int, default=2000)
    args = parser.parse_args()
    bulk(args.gib, args.repeats)
    idle(args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
