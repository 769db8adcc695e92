"""Lifecycle under load: reloads, worker kills and scaling while clients verify every byte.

Run as ``scripts/chaos`` (prints a summary) or ``scripts/chaos --json FILE``
(the integration test reads that).  Everything runs on 127.0.0.1 and stops by
itself after ``--duration`` seconds plus cleanup.

What happens:

- two echo backends (every byte XOR 0x5A, so a pass proves the bytes crossed
  a backend), and prefork-proxy with ``--workers`` workers in front of them;
- ``--clients`` threads loop: connect, send 1-64 KiB of random bytes, read
  the transformed echo, compare, close;
- a long-lived stream is opened before the first reload and exchanges
  checked bytes every 100 ms until the end;
- over the run, spaced evenly: 10 SIGHUPs (each changing the config; one
  invalid), 3 SIGKILLs of random current workers, SIGTTIN twice, SIGTTOU twice.

Principle (honest accounting of SIGKILL): a connection held by a worker at the
moment it is SIGKILLed dies with it; no design can save it.  Before each kill
the victim is stopped (SIGSTOP), the client ports of the connections it holds
are read from /proc, and only then is it killed.  Failures on exactly those
ports are reported as ``lost_in_killed_workers``; every other failure counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import selectors
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test helpers
from support import ProxyProcess, free_port, process_title, transform, wait_for  # noqa: E402

# --------------------------------------------------------------------------- backends


def _echo_server(port_queue) -> None:
    """An XOR echo backend (runs in its own process)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    server.setblocking(False)
    port_queue.put(server.getsockname()[1])
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, None)
    pending: Dict[socket.socket, bytearray] = {}
    while True:
        for key, events in selector.select():
            if key.data is None:
                try:
                    conn, _ = server.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                pending[conn] = bytearray()
                selector.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            out = pending[conn]
            try:
                if events & selectors.EVENT_READ:
                    data = conn.recv(262144)
                    if not data:
                        raise ConnectionResetError
                    out += transform(data)
                if out:
                    del out[:conn.send(out)]
            except BlockingIOError:
                pass
            except OSError:
                selector.unregister(conn)
                pending.pop(conn, None)
                conn.close()
                continue
            selector.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0),
                            "conn")


def start_backends(count: int) -> tuple:
    context = get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_echo_server, args=(queue,), daemon=True)
                 for _ in range(count)]
    for process in processes:
        process.start()
    ports = [queue.get(timeout=10) for _ in processes]
    return processes, [f"127.0.0.1:{port}" for port in ports]


# --------------------------------------------------------------------------- the proxy


class Proxy(ProxyProcess):
    """prefork-proxy started from a config file it rewrites for reloads, its log in a file."""

    def __init__(self, workdir: Path, port: int, backends: List[str], workers: int) -> None:
        self.workdir = workdir
        self.listen_port = port
        self.backends = backends
        self.config = workdir / "proxy.toml"
        self.pidfile = workdir / "proxy.pid"
        self.write_config(workers=workers, threads=2, timeout_ms=2000, backends=backends)
        super().__init__(["start", "--config", str(self.config)], workdir / "proxy.log")

    def write_config(self, *, workers: int, threads: int, timeout_ms: int, backends: List[str],
                     invalid: bool = False) -> None:
        backend_list = ", ".join(f'"{b}"' for b in backends)
        text = (f"[server]\nworkers = {workers}\nthreads = {threads}\n"
                f"drain_timeout_s = 60\npidfile = \"{self.pidfile}\"\n\n"
                f"[[tcp_proxy]]\nbind = \"127.0.0.1:{self.listen_port}\"\n"
                f"backends = [{backend_list}]\nconnect_timeout_ms = {timeout_ms}\n")
        if invalid:
            text = text.replace("connect_timeout_ms", "conect_timeout_ms")  # a typo'd key
        temporary = self.config.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.replace(self.config)

    def wait_log(self, text: str, timeout: float, count: int = 1) -> None:
        def logged() -> bool:
            self.check_running()
            return self.log.count(text) >= count

        wait_for(logged, timeout, message=f"{text!r} x{count} in the log")

    def workers(self, generation: Optional[int] = None) -> List[int]:
        pids = self.worker_pids()
        if generation is None:
            return pids
        titled = []
        for pid in pids:
            try:
                if process_title(pid).endswith(f"gen {generation}"):
                    titled.append(pid)
            except FileNotFoundError:
                pass
        return titled

    def generation(self) -> int:
        found = re.findall(r"generation (\d+) serves", self.log)
        return int(found[-1]) if found else 1


def client_ports_held_by(pid: int, proxy_port: int) -> Set[int]:
    """Client-side ports of the connections process ``pid`` has accepted on ``proxy_port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(local.rsplit(":", 1)[1], 16) == proxy_port:
                ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------- load


@dataclass
class Tally:
    ok: int = 0
    failures: List[dict] = field(default_factory=list)
    mismatched_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(port: int, stop: threading.Event, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        local_port = 0
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
                local_port = sock.getsockname()[1]
                message = rng.randbytes(rng.randint(1, 64 * 1024))
                sock.sendall(message)
                received = bytearray()
                while len(received) < len(message):
                    chunk = sock.recv(len(message) - len(received))
                    if not chunk:
                        raise ConnectionError(f"EOF after {len(received)} of {len(message)}")
                    received += chunk
                expected = transform(message)
                if received != expected:
                    wrong = sum(1 for a, b in zip(received, expected) if a != b)
                    with tally.lock:
                        tally.mismatched_bytes += wrong
                    raise ValueError(f"{wrong} mismatched bytes")
            with tally.lock:
                tally.ok += 1
        except (OSError, ValueError) as exc:
            with tally.lock:
                tally.failures.append({"port": local_port, "error": repr(exc),
                                       "at": time.monotonic()})


class LongStream(threading.Thread):
    """One connection, opened before the first reload, exchanging checked bytes until stopped."""

    def __init__(self, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.stop_event = stop
        self.turns = 0
        self.bytes = 0
        self.error: Optional[str] = None

    def run(self) -> None:
        rng = random.Random(7)
        try:
            while not self.stop_event.wait(0.1):
                message = rng.randbytes(8192)
                self.sock.sendall(message)
                received = bytearray()
                while len(received) < len(message):
                    chunk = self.sock.recv(len(message) - len(received))
                    if not chunk:
                        raise ConnectionError("EOF")
                    received += chunk
                if received != transform(message):
                    raise ValueError("mismatched bytes")
                self.turns += 1
                self.bytes += len(message)
        except (OSError, ValueError) as exc:
            self.error = repr(exc)
        finally:
            self.sock.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Report:
    duration_s: float
    clients: int
    workers: int
    connections: int = 0
    failed: int = 0
    lost_in_killed_workers: int = 0
    mismatched_bytes: int = 0
    long_stream_turns: int = 0
    long_stream_bytes: int = 0
    long_stream_error: Optional[str] = None
    reloads: int = 0
    invalid_reloads_rejected: int = 0
    kills: int = 0
    respawn_ms: List[float] = field(default_factory=list)
    scale_events: int = 0
    proxy_exit_code: Optional[int] = None
    failures: List[dict] = field(default_factory=list)


def run(duration: float, clients: int, workers: int) -> Report:
    report = Report(duration_s=duration, clients=clients, workers=workers)
    backend_processes, backends = start_backends(2)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="prefork-chaos-"))
    proxy = Proxy(workdir, port, backends[:1], workers)
    stop = threading.Event()
    tally = Tally()
    excused: Set[int] = set()
    try:
        long_stream = LongStream(port, stop)
        long_stream.start()
        threads = [threading.Thread(target=client_loop, args=(port, stop, tally, seed),
                                    daemon=True) for seed in range(clients)]
        for thread in threads:
            thread.start()

        # The schedule: 10 reloads, 3 kills, 2 TTIN, 2 TTOU, spread over the run.
        events = (["hup"] * 10) + (["kill"] * 3) + ["ttin", "ttin", "ttou", "ttou"]
        rng = random.Random(1)
        rng.shuffle(events)
        events.remove("hup")
        events.insert(0, "hup")  # the first event is a reload: the long stream predates it
        invalid_at = 4  # the 5th reload carries an invalid config
        started = time.monotonic()
        hups = 0
        for index, event in enumerate(events):
            due = started + duration * (index + 0.5) / len(events)
            time.sleep(max(0.0, due - time.monotonic()))  # a schedule, not a synchronisation
            if event == "hup":
                invalid = hups == invalid_at
                proxy.write_config(workers=workers + hups % 2, threads=2 + hups % 2,
                                   timeout_ms=2000 + 100 * hups,
                                   backends=backends[:1 + (hups + 1) % 2], invalid=invalid)
                generation = proxy.generation()
                proxy.signal(signal.SIGHUP)
                if invalid:
                    proxy.wait_log("reload failed", 10, count=1)
                    report.invalid_reloads_rejected += 1
                else:
                    proxy.wait_log(f"generation {generation + 1} serves", 10)
                    report.reloads += 1
                hups += 1
            elif event == "kill":
                candidates = proxy.workers(proxy.generation())
                if not candidates:
                    continue
                victim = rng.choice(candidates)
                os.kill(victim, signal.SIGSTOP)
                while open(f"/proc/{victim}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
                    time.sleep(0.001)
                excused |= client_ports_held_by(victim, port)
                before = set(proxy.workers())
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                report.kills += 1
                deadline = killed_at + 10
                while time.monotonic() < deadline:
                    fresh = set(proxy.workers()) - before
                    if fresh and all(f"pid={p} " in proxy.log for p in fresh):
                        report.respawn_ms.append((time.monotonic() - killed_at) * 1000)
                        break
                    time.sleep(0.002)
            else:
                name = "SIGTTIN" if event == "ttin" else "SIGTTOU"
                before = proxy.log.count(f"{name}:")
                proxy.signal(signal.SIGTTIN if event == "ttin" else signal.SIGTTOU)
                proxy.wait_log(f"{name}:", 10, count=before + 1)
                report.scale_events += 1
        time.sleep(max(0.0, started + duration - time.monotonic()))
    finally:
        stop.set()
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and thread.daemon:
                thread.join(20)
        report.proxy_exit_code = proxy.stop(70)  # SIGTERM; SIGKILL after 70 s
        for process in backend_processes:
            process.terminate()

    report.connections = tally.ok + len(tally.failures)
    report.mismatched_bytes = tally.mismatched_bytes
    lost = [f for f in tally.failures if f["port"] in excused]
    report.lost_in_killed_workers = len(lost)
    report.failures = [f for f in tally.failures if f["port"] not in excused]
    report.failed = len(report.failures)
    report.long_stream_turns = long_stream.turns
    report.long_stream_bytes = long_stream.bytes
    report.long_stream_error = long_stream.error
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args()
    report = run(args.duration, args.clients, args.workers)
    summary = asdict(report)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    respawn = sorted(report.respawn_ms)
    print(f"connections: {report.connections} total, {report.failed} failed, "
          f"{report.lost_in_killed_workers} lost with a SIGKILLed worker, "
          f"{report.mismatched_bytes} mismatched bytes")
    print(f"long stream: {report.long_stream_turns} turns, {report.long_stream_bytes} bytes "
          f"verified, error: {report.long_stream_error}")
    print(f"events: {report.reloads} reloads, {report.invalid_reloads_rejected} invalid reload "
          f"rejected, {report.kills} SIGKILLs, {report.scale_events} TTIN/TTOU")
    if respawn:
        print(f"respawn after SIGKILL: p50 {respawn[len(respawn) // 2]:.0f} ms, "
              f"max {respawn[-1]:.0f} ms")
    print(f"proxy exit code after SIGTERM: {report.proxy_exit_code}")
    for failure in report.failures[:10]:
        print("failure:", failure)
    ok = (report.failed == 0 and report.mismatched_bytes == 0 and report.long_stream_error is None
          and report.proxy_exit_code == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
