"""Helpers shared by the tests: real processes, real sockets, waits on conditions.

``ProxyProcess`` runs the real ``prefork-proxy`` CLI (``python -m prefork_proxy``)
as a child process and waits for its ``ready`` log line; ``start_backend``
runs a ``tests/backends.py`` server in its own process.  Every wait is bounded
and waits for a condition, never for a fixed time.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, TypeVar

HERE = Path(__file__).resolve().parent
XOR_TABLE = bytes(b ^ 0x5A for b in range(256))
T = TypeVar("T")


def transform(data: bytes) -> bytes:
    """What the test backends do to every byte (see backends.py)."""
    return data.translate(XOR_TABLE)


def wait_for(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
             message: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {message}")
        time.sleep(interval)


class BackendProcess:
    """A tests/backends.py server in its own process."""

    def __init__(self, mode: str, name: str = "backend", *extra: str) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "backends.py"), mode, "--name", name, *extra],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"backend {mode} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(5)
        if self.process.stdout:
            self.process.stdout.close()


class ProxyProcess:
    """The real prefork-proxy CLI as a child process; logs go to ``log_path``."""

    READY = re.compile(r"ready pid=(\d+) listeners=(\S+)")

    def __init__(self, args: Iterable[str], log_path: Path, wait_ready: bool = True,
                 preexec_fn: Optional[Callable[[], None]] = None,
                 env: Optional[dict] = None, command: Optional[List[str]] = None) -> None:
        """Run ``python -m prefork_proxy ARGS``, or ``command`` as given (e.g. the API)."""
        self.args = command or [sys.executable, "-m", "prefork_proxy", *args]
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                                        env=env)
        self.pid = self.process.pid
        self.listeners: List[str] = []
        if wait_ready:
            self.wait_ready()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> Optional[re.Match]:
            if self.process.poll() is not None:
                raise AssertionError(f"proxy exited with {self.process.returncode}:\n{self.log}")
            return self.READY.search(self.log)

        match = wait_for(ready, timeout, message="the proxy's ready line")
        self.listeners = match.group(2).split(",")

    def port(self, index: int = 0) -> int:
        return int(self.listeners[index].rsplit(":", 1)[1])

    def connect(self, index: int = 0, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port(index)), timeout=timeout)

    def worker_pids(self) -> List[int]:
        """The master's children but its admin process (which has its own title)."""
        pids = []
        for pid in children_of(self.pid):
            try:
                if process_title(pid) == "prefork-proxy: admin":
                    continue
            except OSError:
                continue  # gone meanwhile
            pids.append(pid)
        return pids

    def wait_workers(self, count: int, timeout: float = 10.0) -> List[int]:
        """Wait until ``count`` workers run and each has logged that it booted."""
        def booted() -> Optional[List[int]]:
            pids = self.worker_pids()
            log = self.log
            if len(pids) == count and all(f"pid={pid} " in log for pid in pids):
                return pids
            return None

        return wait_for(booted, timeout, message=f"{count} booted workers")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait(5)
        self.log_file.close()
        return self.process.returncode


def children_of(pid: int) -> List[int]:
    """Direct children of ``pid``, from /proc (needs CONFIG_PROC_CHILDREN, as on Debian)."""
    pids: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except FileNotFoundError:
        pass
    return sorted(pids)


def process_state(pid: int) -> Optional[str]:
    """The one-letter state in /proc/PID/stat (``Z`` for a zombie), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has exited)."""
    return process_state(pid) not in (None, "Z")


def status_field(pid: int, name: str) -> int:
    """The first number of the ``name:`` line in /proc/PID/status (Threads, VmRSS, PPid...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name}: line in /proc/{pid}/status")


def thread_count(pid: int) -> int:
    return status_field(pid, "Threads")


def rss_kib(pid: int) -> int:
    return status_field(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, received = [], 0
    while received < size:
        chunk = sock.recv(min(size - received, 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF after {received} of {size} bytes")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
