#!/usr/bin/env python3
"""System calls per request (and per new connection) of each proxy, side by side.

    .venv/bin/python scripts/syscall_floor.py [--peer haproxy --peer prefork] \\
        [--workload keepalive --workload newconn] [--seconds 5]

Why: the issue-15 goals ask for more kept-alive requests per second than
HAProxy by a margin (1.2x).  On loopback most of a relayed request's cost is
in the kernel (the recv and send of each direction), so a proxy can only be
much faster than another if it makes fewer system calls per request, or if
the other wastes CPU in user space.  This counts the first; the untimed
question "how far apart can they be" then has a number.

For each ``--peer`` (the ``scripts/bench`` peers, started the same way, in
front of one redis-server) and each ``--workload`` (``keepalive``:
``redis-benchmark -k 1``, 50 clients, PING; ``newconn``: ``-k 0``, a new
connection per request), it runs the load for ``--seconds`` untraced (the
peer's CPU per unit, from /proc, its whole process tree), then as long again
under ``strace -c -f`` attached to every process of the peer's tree, and
prints each system call per unit (a request, or a connection: redis's own
counters tell how many), errors (``EAGAIN``) counted apart.  strace slows
the peer several times over; the counts per unit are what it is for, not
times.  Needs strace, redis-server and redis-benchmark.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.dont_write_bytecode = True  # keep scripts/bench_lib free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import procfs, procs  # noqa: E402
from bench_lib.peers import PeerOptions, start_peer  # noqa: E402
from bench_lib.variant_run import start_redis  # noqa: E402

WORKLOADS = ("keepalive", "newconn")
#: Seconds of load before anything is counted (connections made, caches warm).
WARMUP_S = 1.0


@dataclass
class SyscallCounts:
    """One strace ``-c`` summary: calls and errors per system call name."""

    calls: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, int] = field(default_factory=dict)


_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?([a-z_0-9]+)\s*$")


def parse_strace_summary(text: str) -> SyscallCounts:
    """The table ``strace -c`` writes (its ``-o`` file): calls and errors by name.

    A pure function over the text; the ``total`` row and anything that is not a
    row of the table are skipped.
    """
    counts = SyscallCounts()
    for line in text.splitlines():
        match = _ROW.match(line)
        if match is None or match.group(3) == "total":
            continue
        calls, errors, name = match.groups()
        counts.calls[name] = counts.calls.get(name, 0) + int(calls)
        if errors:
            counts.errors[name] = counts.errors.get(name, 0) + int(errors)
    return counts


def _redis_stat(port: int, name: str) -> int:
    """One counter of redis's ``INFO stats`` (asked over a direct connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO stats\r\n")
        reply = b""
        while True:  # a bulk string: "$<length>\r\n" and that many bytes
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
            head, found, rest = reply.partition(b"\r\n")
            if found and head.startswith(b"$") and len(rest) >= int(head[1:]):
                break
    match = re.search(rb"^" + name.encode() + rb":(\d+)", reply, re.M)
    if match is None:
        raise SystemExit(f"redis INFO stats has no {name}")
    return int(match.group(1))


def _units(redis_port: int, workload: str) -> int:
    """Requests (keepalive) or backend connections (newconn) redis has seen so far."""
    counter = "total_commands_processed" if workload == "keepalive" else \
        "total_connections_received"
    return _redis_stat(redis_port, counter)


@dataclass
class Measurement:
    peer: str
    workload: str
    units_per_s: float
    cpu_us_per_unit: float
    traced_units: int
    per_unit: Dict[str, float]
    errors_per_unit: Dict[str, float]


def measure(peer_root: int, port: int, redis_port: int, peer: str, workload: str,
            seconds: float) -> Measurement:
    """One peer under one workload: untraced CPU per unit, then traced system calls."""
    argv = ["redis-benchmark", "-p", str(port), "-c", "50", "-k",
            "1" if workload == "keepalive" else "0", "-t", "ping_mbulk",
            "-n", "100000000", "-q"]
    bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracer: Optional[subprocess.Popen] = None
    try:
        time.sleep(WARMUP_S)  # a fixed warm-up of a load that runs until killed
        cpu0, units0, t0 = procfs.tree_cpu_seconds(peer_root), _units(redis_port, workload), \
            time.monotonic()
        time.sleep(seconds)
        cpu1, units1, t1 = procfs.tree_cpu_seconds(peer_root), _units(redis_port, workload), \
            time.monotonic()
        untraced = max(1, units1 - units0)
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            pids = procfs.tree_pids(peer_root)
            command = ["strace", "-c", "-f", "-o", out.name]
            for pid in pids:
                command += ["-p", str(pid)]
            # The units are bracketed: counted from just before strace starts to
            # just after it has detached, so the calls it saw are of those units
            # (attaching takes milliseconds: a few units too many, not too few).
            units2 = _units(redis_port, workload)
            tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            time.sleep(seconds)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=60)
            tracer = None
            units3 = _units(redis_port, workload)
            summary = parse_strace_summary(Path(out.name).read_text())
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        bench.kill()
        bench.wait()
    traced = max(1, units3 - units2)
    per = {name: calls / traced for name, calls in summary.calls.items()}
    errors = {name: count / traced for name, count in summary.errors.items()}
    return Measurement(peer, workload, untraced / (t1 - t0),
                       (cpu1 - cpu0) / untraced * 1e6, traced, per, errors)


def _table(results: List[Measurement], workload: str) -> str:
    rows = [r for r in results if r.workload == workload]
    if not rows:
        return ""
    unit = "request" if workload == "keepalive" else "connection"
    names = sorted({n for r in rows for n, v in r.per_unit.items() if v >= 0.01},
                   key=lambda n: -max(r.per_unit.get(n, 0.0) for r in rows))
    lines = [f"### {workload}: system calls per {unit}", "",
             "| system call | " + " | ".join(r.peer for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in names:
        cells = []
        for r in rows:
            value = r.per_unit.get(name, 0.0)
            failed = r.errors_per_unit.get(name, 0.0)
            cells.append(f"{value:.2f}" + (f" ({failed:.2f} failed)" if failed >= 0.01 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **all** | " + " | ".join(
        f"**{sum(r.per_unit.values()):.2f}**" for r in rows) + " |")
    lines.append(f"| {unit}s/s untraced | " + " | ".join(
        f"{r.units_per_s:,.0f}" for r in rows) + " |")
    lines.append(f"| CPU µs per {unit} untraced | " + " | ".join(
        f"{r.cpu_us_per_unit:.1f}" for r in rows) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="append", choices=["haproxy", "nginx", "socat",
                                                            "prefork"],
                        help="peers to count (default: haproxy and prefork)")
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="default: both")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="seconds per window, untraced and traced (default 5)")
    parser.add_argument("--prefork-cmd", default=None,
                        help="the prefork-proxy command, one string (default: the one "
                        "beside this Python)")
    args = parser.parse_args()
    for tool in ("strace", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: strace, redis-server, redis-tools)")
    peers = args.peer or ["haproxy", "prefork"]
    workloads = args.workload or list(WORKLOADS)
    opts = PeerOptions(prefork_cmd=shlex.split(args.prefork_cmd) if args.prefork_cmd else None,
                       prefork_relay=None)
    results: List[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="syscall-floor-") as workdir:
        reg = procs.Registry(Path(workdir))
        try:
            redis_port = start_redis(reg, False, "")
            for peer in peers:
                endpoint = start_peer(reg, peer, "redis", redis_port, opts)
                assert endpoint.proc is not None
                procs.wait_ready(endpoint.proc, endpoint.port, procs.probe_redis, timeout=60)
                for workload in workloads:
                    result = measure(endpoint.proc.pid, endpoint.port, redis_port, peer,
                                     workload, args.seconds)
                    print(f"{peer} {workload}: {result.units_per_s:,.0f}/s untraced, "
                          f"{sum(result.per_unit.values()):.2f} system calls per unit "
                          f"({result.traced_units} traced)", file=sys.stderr, flush=True)
                    results.append(result)
                reg.stop(endpoint.proc)
        finally:
            reg.stop_all()
    for workload in workloads:
        print(_table(results, workload))
        print()
    print("System calls per unit: strace's counts over the units from just before it "
          "attached to just after it detached. CPU: the peer's process tree, untraced.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
