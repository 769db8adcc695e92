"""Growth workloads (prefork-proxy only): does the cost stay flat as the work grows?

One prefork-proxy instance, started from a config file (a reload needs one),
with four listeners on one set of workers:

- ``ping``: in front of redis; kept-alive PING without, then with, N idle
  connections held open through ``idle`` at the same time;
- ``idle``: in front of the echo/hold backend; the N idle connections, held by
  a separate process (``hold_clients.py``), so its N client sockets, the
  proxy's 2N and the backend's N stay in different processes, each under the
  20,000 open-file limit;
- ``many``: 1,000 backends with weights 1-10 (seeded), every one redis's
  address: each is a slot, a member and a share of the schedule of its own, so
  the balancer does all its per-backend work, while redis stays the same
  server for both listeners (1,000 redis processes would measure the machine);
- ``two``: 2 backends (weights 1 and 3), the same redis, for comparison.

And the reload: SIGHUP with the N connections open; the time until every
worker of the new generation has logged ``booted`` (the master forks them
before it retires the old ones, so they serve from then on), and the master's
CPU over a fixed window of the drain that follows. Peers have no equivalent
(HAProxy reloads by re-executing, nginx by re-reading in its master), so these
figures are prefork-proxy's own; the ratios compare it with itself.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import procfs
from .procs import Managed, Registry

HOLD_CLIENTS = Path(__file__).resolve().parent / "hold_clients.py"
MANY_BACKENDS = 1000
BOOTED = re.compile(r"worker (\d+) booted: pid=(\d+)")


@dataclass
class GrowthPorts:
    ping: int
    idle: int
    many: int
    two: int


def write_config(path: Path, ports: GrowthPorts, redis_port: int, hold_port: int,
                 workers: int = 2, drain_timeout_s: float = 10.0, seed: int = 15) -> Path:
    """The growth instance's TOML config: the four listeners above."""
    rng = random.Random(seed)
    many = ",\n    ".join(f'{{ address = "127.0.0.1:{redis_port}", weight = {rng.randint(1, 10)} }}'
                          for _ in range(MANY_BACKENDS))
    path.write_text(f"""\
[server]
workers = {workers}
drain_timeout_s = {drain_timeout_s:g}

[[tcp_proxy]]
bind = "127.0.0.1:{ports.ping}"
backends = ["127.0.0.1:{redis_port}"]

[[tcp_proxy]]
bind = "127.0.0.1:{ports.idle}"
backends = ["127.0.0.1:{hold_port}"]

[[tcp_proxy]]
bind = "127.0.0.1:{ports.many}"
backends = [
    {many}]

[[tcp_proxy]]
bind = "127.0.0.1:{ports.two}"
backends = [{{ address = "127.0.0.1:{redis_port}", weight = 1 }},
            {{ address = "127.0.0.1:{redis_port}", weight = 3 }}]
""")
    return path


def start_holder(reg: Registry, python: str, port: int, count: int,
                 timeout: float = 180.0) -> tuple[Managed | None, dict]:
    """Start ``hold_clients.py`` and wait (bounded) until it holds ``count`` connections."""
    proc = reg.start("hold-clients", [python, str(HOLD_CLIENTS), "--port", str(port),
                                      "--count", str(count), "--timeout", str(timeout)])
    deadline = time.monotonic() + timeout + 10
    while time.monotonic() < deadline:
        try:
            text = proc.stdout_path.read_text()
        except OSError:
            text = ""
        if text.startswith("ready"):
            fields = text.split()
            return proc, {"held": int(fields[1]), "open_s": float(fields[2])}
        if text.startswith("error") or not proc.alive():
            reg.stop(proc)
            return None, {"error": f"holder: {text.strip() or proc.stderr_tail(5)}"}
        time.sleep(0.05)
    reg.stop(proc)
    return None, {"error": f"holder: not ready after {timeout + 10:.0f} s"}


def booted_pids(log_path: Path, offset: int) -> set[int]:
    """Pids of the workers that logged ``booted`` after byte ``offset`` of the log."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return set()
    return {int(m.group(2)) for m in BOOTED.finditer(text)}


def measure_reload(master: Managed, workers: int, window_s: float,
                   timeout: float = 30.0) -> dict:
    """SIGHUP the master; time until ``workers`` new workers booted; master CPU after.

    The master's CPU (utime+stime from /proc) is read from the SIGHUP over
    ``window_s`` seconds of the drain (the old generation still holds every
    open connection), as seconds and as a share of one CPU.
    """
    log_path = master.stderr_path
    offset = log_path.stat().st_size
    cpu_before = procfs.process_cpu_seconds(master.pid)
    started = time.monotonic()
    os.kill(master.pid, signal.SIGHUP)
    result: dict = {}
    while time.monotonic() - started < timeout:
        if len(booted_pids(log_path, offset)) >= workers:
            result["reload_s"] = time.monotonic() - started
            break
        if not master.alive():
            return {"error": f"the master exited during the reload: {master.stderr_tail(5)}"}
        time.sleep(0.005)
    else:
        return {"error": f"no new generation of {workers} workers within {timeout:.0f} s"}
    rest = window_s - (time.monotonic() - started)
    if rest > 0:
        time.sleep(rest)
    span = time.monotonic() - started
    cpu = procfs.process_cpu_seconds(master.pid) - cpu_before
    result.update(master_cpu_s=cpu, window_s=span, master_cpu_share=cpu / span)
    return result
