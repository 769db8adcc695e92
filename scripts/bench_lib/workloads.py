"""The workloads: iperf3 bulk, redis-benchmark request/response, idle connections.

Each function runs one bounded measurement against a loopback port and returns
a plain dict (it goes verbatim into the JSON samples). Failures are returned as
``{"error": ...}`` rather than raised, so one broken peer or run does not lose
the rest of the benchmark.
"""
from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import time
from typing import Callable, Sequence

from . import procfs


def run_iperf(port: int, duration: float, streams: int, reverse: bool,
              cpu_root: int | None) -> dict:
    """One iperf3 client run; Gbit/s received, bytes moved, proxy CPU seconds."""
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration),
            "-P", str(streams), "--json", "--connect-timeout", "3000"]
    if reverse:
        argv.append("-R")
    cpu_before = procfs.tree_cpu_seconds(cpu_root) if cpu_root else None
    result = _run_json(argv, timeout=duration + 30)
    if cpu_root:
        # Let the proxy see the close and socat reap its children, so their
        # CPU time lands in the parent's cutime/cstime before we read it.
        time.sleep(0.3)
        result["proxy_cpu_s"] = procfs.tree_cpu_seconds(cpu_root) - cpu_before
    return result


def _run_json(argv: list[str], timeout: float) -> dict:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 timed out after {timeout:.0f} s"}
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": f"iperf3 exited {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}"}
    if "error" in data:
        return {"error": f"iperf3: {data['error']}"}
    received = data["end"]["sum_received"]
    return {"gbps": received["bits_per_second"] / 1e9, "bytes": int(received["bytes"]),
            "seconds": received["seconds"]}


def run_redis_benchmark(port: int, clients: int, requests: int, keepalive: bool,
                        test: str, timeout: float, extra: Sequence[str] = ()) -> dict:
    """redis-benchmark PING: req/s and latency percentiles (ms) from its CSV.

    ``extra``: more redis-benchmark options (e.g. ``--tls --sni NAME --insecure``).
    """
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
            "-n", str(requests), "-t", test, "--csv", *extra]
    if not keepalive:
        argv[1:1] = ["-k", "0"]
    started = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"redis-benchmark timed out after {timeout:.0f} s"}
    elapsed = time.monotonic() - started
    rows = parse_redis_csv(proc.stdout)
    if proc.returncode != 0 or not rows:
        return {"error": f"redis-benchmark exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout)[-300:]}"}
    row = rows[-1]
    return {"test": row["test"], "rps": row["rps"], "p50_ms": row.get("p50_latency_ms"),
            "p99_ms": row.get("p99_latency_ms"), "avg_ms": row.get("avg_latency_ms"),
            "wall_s": elapsed, "all_rows": rows}


def parse_redis_csv(text: str) -> list[dict]:
    """Rows of redis-benchmark --csv (7.x: test,rps,avg,min,p50,p95,p99,max)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"test"')), None)
    if start is None:
        return parse_redis_text(text)
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        try:
            rows.append({k: (rec[k] if k == "test" else float(rec[k])) for k in rec if k})
        except (TypeError, ValueError):
            continue
    return rows


def parse_redis_text(text: str) -> list[dict]:
    """Fallback for older redis-benchmark: rps only, from its old 2-column CSV
    (`"PING_INLINE","12345.67"`) or its normal `NAME: N requests per second` lines."""
    rows = []
    old_csv = re.compile(r'^"([^"]+)","([\d.]+)"$')
    plain = re.compile(r"^([A-Z_]+(?: \([^)]*\))?): ([\d.]+) requests per second")
    for line in text.splitlines():
        match = old_csv.match(line.strip()) or plain.match(line.strip())
        if match:
            rows.append({"test": match.group(1), "rps": float(match.group(2))})
    return rows


def run_idle(port: int, count: int, pss_root: int | None, settle: float = 1.0,
             timeout: float = 120.0, detail: Callable[[], dict] | None = None) -> dict:
    """Open ``count`` connections, round-trip one byte on each, hold, measure PSS.

    Connections are opened one after another, each checked by an echo round
    trip before the next: that keeps us within any listen backlog and proves
    every connection really reaches the backend. ``detail``, if given, is
    called next to each PSS reading (e.g. PSS per process); its results go in
    ``detail_before`` / ``detail_after``.
    """
    measure = (lambda: procfs.tree_pss_kib(pss_root)) if pss_root else (lambda: (0, 0))
    result: dict = {"requested": count, "opened": 0, "alive_after_hold": 0, "open_s": 0.0}
    try:
        # A few throw-away connections first, so one-off lazy setup (first
        # accept, first backend connect, imports) lands in the baseline, not
        # in the per-connection delta.
        for _ in range(10):
            _open_checked(port).close()
    except OSError as exc:
        result["error"] = f"warm-up connection failed: {exc}"
        return result
    time.sleep(0.3)
    before = measure()
    if detail:
        result["detail_before"] = detail()
    socks: list[socket.socket] = []
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() - started > timeout:
                result["error"] = f"timed out after {timeout:.0f} s"
                break
            socks.append(_open_checked(port))
    except OSError as exc:
        result["error"] = f"after {len(socks)} connections: {exc}"
    result["open_s"] = time.monotonic() - started
    try:
        time.sleep(settle)  # hold: let the proxy settle its buffers
        after = measure()
        if detail:
            result["detail_after"] = detail()
        result["alive_after_hold"] = sum(_still_open(s) for s in socks)
    finally:
        for sock in socks:
            sock.close()
    result.update(opened=len(socks), pss_before_kib=before[0], pss_after_kib=after[0],
                  procs_before=before[1], procs_after=after[1])
    if socks and pss_root:
        result["kib_per_conn"] = (after[0] - before[0]) / len(socks)
    return result


def _open_checked(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.settimeout(5)
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise ConnectionError("no echo from backend")
    except OSError:
        sock.close()
        raise
    return sock


def _still_open(sock: socket.socket) -> bool:
    """True if the peer has not closed the connection (non-blocking peek)."""
    try:
        sock.setblocking(False)
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
