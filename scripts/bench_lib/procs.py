"""Starting, probing and stopping the processes the benchmark owns.

Every process is started in its own session (``start_new_session=True``) so
that its pid is also its process-group id: stopping it signals the whole group
(nginx workers, socat's per-connection children) by that id, and nothing the
benchmark did not start is ever signalled.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import procfs

Probe = Callable[[int], None]


class StartError(RuntimeError):
    """A process could not be started or never became ready."""


@dataclass
class Managed:
    """One process we started, with its logs."""

    name: str
    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.stderr_path, self.stdout_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, wait up to ``grace`` s, then SIGKILL leftovers."""
        if self.popen.returncode is None:
            # The leader is not reaped yet, so its pid (= our pgid) is still ours.
            _killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _killpg(self.pid, signal.SIGKILL)
                try:
                    self.popen.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        # Group members that outlived the leader (a pgid cannot be reused while
        # any member exists, so whatever still carries it is ours).
        deadline = time.monotonic() + grace
        while (members := procfs.group_members(self.pid)) and time.monotonic() < deadline:
            for pid in members:
                _kill(pid, signal.SIGTERM)
            time.sleep(0.1)
        for pid in procfs.group_members(self.pid):
            _kill(pid, signal.SIGKILL)


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Registry:
    """Starts processes with logs under ``workdir`` and stops them all at the end."""

    workdir: Path
    processes: list[Managed] = field(default_factory=list)
    _used_ports: set[int] = field(default_factory=set)

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Managed:
        logdir = self.workdir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        # A restarted process gets its own logs (name.2.err, ...), so the
        # previous instance's log survives and its `ready` line cannot be
        # mistaken for the new instance's.
        stem, n = name, 1
        while (logdir / f"{stem}.err").exists():
            n += 1
            stem = f"{name}.{n}"
        out_path, err_path = logdir / f"{stem}.out", logdir / f"{stem}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    env=env, cwd=cwd, start_new_session=True)
            except OSError as exc:
                raise StartError(f"{name}: cannot run {argv[0]}: {exc}") from exc
        proc = Managed(name, popen, out_path, err_path)
        self.processes.append(proc)
        return proc

    def free_port(self) -> int:
        """A loopback port that is free now and not handed out before in this run.

        Taken from below the kernel's ephemeral range: the new-connection test
        leaves tens of thousands of TIME_WAIT sockets on ephemeral ports, and
        when every ephemeral port holds one, asking the kernel for port 0
        fails with EADDRINUSE.
        """
        low = ephemeral_range()[0]
        candidates = list(range(max(1024, low - 12000), low)) if low > 3000 else []
        random.shuffle(candidates)
        for port in candidates[:500] or [0] * 20:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                port = sock.getsockname()[1]
            if port not in self._used_ports:
                self._used_ports.add(port)
                return port
        raise StartError("no free loopback port found")

    def stop(self, proc: Managed) -> None:
        """Stop one process now and forget it (it must not be signalled twice)."""
        proc.stop()
        if proc in self.processes:
            self.processes.remove(proc)

    def stop_all(self) -> None:
        # Proxies first (reverse start order), backends last.
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


def wait_ready(proc: Managed | None, port: int, probe: Probe, timeout: float = 15.0) -> None:
    """Poll ``probe(port)`` until it succeeds, bounded by ``timeout`` seconds.

    A process that exits while we wait fails fast with the tail of its logs.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise StartError(f"{proc.name} exited with code {proc.popen.returncode}:\n"
                             f"{proc.stderr_tail()}")
        try:
            probe(port)
            return
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    name = proc.name if proc else f"port {port}"
    tail = f"\n{proc.stderr_tail()}" if proc else ""
    raise StartError(f"{name} not ready on 127.0.0.1:{port} after {timeout:.0f} s "
                     f"(last error: {last_error}){tail}")


def wait_log_word(proc: Managed, word: str, timeout: float = 15.0) -> bool:
    """True once ``word`` appears in the process's stderr (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if word in proc.stderr_path.read_text(errors="replace").lower():
                return True
        except OSError:
            pass
        if not proc.alive():
            return False
        time.sleep(0.05)
    return False


# --- readiness probes: each proves data flows end to end, not just that
# --- something listens (a prefork master listens before any worker accepts).

def probe_connect(port: int) -> None:
    """Connect and close; used for iperf3, which tolerates bare connections."""
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def probe_echo(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(b"p")
        if sock.recv(1) != b"p":
            raise ConnectionError("echo probe: no echo")


def probe_redis(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
        if not reply.startswith(b"+PONG"):
            raise ConnectionError(f"redis probe: unexpected reply {reply!r}")
