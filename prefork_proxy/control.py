"""Talking to a running master through its pidfile: ``reload``, ``stop``, ``status``.

The master (``master.py``) writes the pidfile once it serves and removes it
when it exits, and rewrites a status file beside it (``PIDFILE.status.json``)
about once a second with what only it can see: its generation and the
workers' rows from the shared scoreboard.  The CLI's ``reload``/``stop``/
``status`` commands run in a separate process and only read these files and
send signals.  A file is written to a temporary name and renamed, so a reader
never sees half of one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Dict, List, Optional

from prefork_proxy.errors import ProxyError


def status_path(pidfile: str) -> str:
    return pidfile + ".status.json"


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def write_pidfile(pidfile: str, pid: int) -> None:
    write_atomically(pidfile, f"{pid}\n")


def remove_files(pidfile: str, pid: int) -> None:
    """Remove the pidfile and status file, if they are still ours."""
    try:
        if read_pid(pidfile) != pid:
            return
    except ProxyError:
        return
    for path in (pidfile, status_path(pidfile)):
        try:
            os.unlink(path)
        except OSError:
            pass


def read_pid(pidfile: str) -> int:
    """The master's pid from ``pidfile``; ``ProxyError`` if absent or not running."""
    try:
        with open(pidfile, encoding="utf-8") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise ProxyError(f"{pidfile}: cannot read a pid: {exc}") from None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ProxyError(f"{pidfile}: no process {pid} is running (stale pidfile)") from None
    except PermissionError:
        pass  # it exists, under another user
    return pid


def signal_master(pidfile: str, signum: int) -> int:
    pid = read_pid(pidfile)
    os.kill(pid, signum)
    return pid


def stop_master(pidfile: str, timeout_s: float, fast: bool = False) -> int:
    """Ask the master to stop and wait (bounded) until it has exited."""
    pid = signal_master(pidfile, signal.SIGINT if fast else signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(pid):
            return pid
        time.sleep(0.05)  # polling another process's exit: there is nothing to wait on
    raise ProxyError(f"master {pid} still running after {timeout_s:.0f} s")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited master whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def read_status(pidfile: str) -> Dict[str, Any]:
    pid = read_pid(pidfile)
    try:
        with open(status_path(pidfile), encoding="utf-8") as f:
            status = json.load(f)
    except (OSError, ValueError) as exc:
        raise ProxyError(f"master {pid} is running, but its status file cannot be read: "
                         f"{exc}") from None
    status["stale_s"] = max(0.0, time.time() - status.get("written_at", 0.0))
    return status


#: A status file older than this means the master loop is not turning.
STALE_AFTER_S = 5.0


def problems(status: Dict[str, Any]) -> List[str]:
    """Why this master is not healthy, if it is not (``status`` then exits 1)."""
    found = []
    if status.get("stale_s", 0.0) > STALE_AFTER_S:
        found.append(f"the status file was written {status['stale_s']:.0f} s ago: "
                     "the master loop is stuck")
    if not any(w["state"] == "serving" for w in status.get("workers", [])):
        found.append("no worker is serving")
    return found


def format_status(status: Dict[str, Any]) -> str:
    """The text ``prefork-proxy status`` prints."""
    lines = [f"master pid {status['pid']}  uptime {_duration(status['uptime_s'])}  "
             f"generation {status['generation']}  workers {len(status['workers'])}/"
             f"{status['desired_workers']}  relay {status['relay']}",
             f"listeners {', '.join(status['listeners'])}"]
    lines.append(f"{'slot':>4} {'gen':>4} {'pid':>8} {'age':>9} {'open':>6} {'accepted':>9} "
                 f"state")
    for worker in status["workers"]:
        lines.append(f"{worker['slot']:>4} {worker['generation']:>4} {worker['pid']:>8} "
                     f"{_duration(worker['age_s']):>9} {worker['active']:>6} "
                     f"{worker['accepted']:>9} {worker['state']}")
    for line in status.get("backends", []):
        lines.append(line)
    lines.extend(f"UNHEALTHY: {problem}" for problem in problems(status))
    return "\n".join(lines)


def _duration(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
