"""The one module of test helpers: real processes, real sockets, waits on conditions.

Used by the tests (``from support import ...``; tests/ is on pytest's path) and
by the scripts (scripts/chaos.py, stalled_readers.py, transfer_figures.py put
tests/ on ``sys.path`` from their own location, so they run from a fresh
clone), which is why it imports only the standard library: no pytest here
(pytest fixtures live in tests/conftest.py).

- ports: ``free_port`` (nothing listens there once it returns),
  ``closed_port`` (held bound, so connects are refused while the block runs)
  and ``accepts`` (does anything listen there now);
- backends: ``BackendProcess`` runs a tests/backends.py server in its own
  process; ``Blackhole`` is a listener that never accepts, with a full queue;
- bytes: ``transform`` is what every test backend does to each byte (XOR 0x5A);
- the proxy: ``ProxyProcess`` runs the real ``prefork-proxy`` CLI
  (``python -m prefork_proxy``) as a child process and waits for its ``ready``
  log line; tests/conftest.py's ``proxy_factory`` starts it through
  pytest-xprocess with the same API.

Every wait is bounded and waits for a condition, never for a fixed time.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar

HERE = Path(__file__).resolve().parent
XOR_TABLE = bytes(b ^ 0x5A for b in range(256))
T = TypeVar("T")


def transform(data: bytes) -> bytes:
    """What the test backends do to every byte (see backends.py)."""
    return data.translate(XOR_TABLE)


#: The lowest port ``free_port`` hands out; its pool ends below the kernel's ephemeral range.
PORT_POOL_START = 10000


def _port_block() -> range:
    """This process's own ports for ``free_port``: below the kernel's ephemeral range
    (so no ``bind(0)`` and no outgoing connect is ever given one), one disjoint block
    per pytest-xdist worker (so two test processes never pick the same)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (ephemeral_low - PORT_POOL_START) // max(count, 1)
    if size < 100:  # an unusual ephemeral range: no room below it
        return range(0)
    start = PORT_POOL_START + (index % count) * size
    return range(start, start + size)


_PORT_BLOCK = _port_block()
_next_port = itertools.count()


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port with nothing bound once this returns (connects to it are refused).

    Ports come from this process's own block (``_port_block``), in turn, each
    checked by binding it: a port the kernel picked with ``bind(0)`` could be
    picked again for another xdist worker's listener or connect before the
    caller binds it (CI saw "address already in use" that way).  Another program
    may still take it: when the port must stay refused for a while, hold it with
    ``closed_port`` instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    block = _PORT_BLOCK
    for _ in range(min(len(block), 2000)):
        port = block[next(_next_port) % len(block)]
        with socket.socket(family) as probe:
            try:
                probe.bind((host, port))
            except OSError:  # in use (or in TIME_WAIT): the next one
                continue
            return port
    with socket.socket(family) as probe:  # no block (or none free): the kernel's choice
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port held bound but not listening for the block: connects to it are refused."""
    with socket.socket() as placeholder:
        placeholder.bind((host, 0))
        yield placeholder.getsockname()[1]


def close_loop_rig(loop: Any, pairs: Iterable[Tuple[socket.socket, socket.socket]],
                   *listeners: socket.socket) -> None:
    """Tear down a unit test's relay loop: both ends of every (client, backend) pair,
    then the loop (stopped, and joined within 5 s), then its listeners."""
    for client, backend in pairs:
        client.close()
        backend.close()
    loop.stop()
    assert loop.join(5), "the relay loop did not stop"
    for listener in listeners:
        listener.close()


def accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Something accepts a connect to host:port (refused, timed out or any error: False)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


class Blackhole:
    """A listener that never accepts and whose queue is full: connects to it hang.

    The kernel drops SYNs to a full accept queue, so a connect stays in SYN_SENT
    exactly as to a dead host, while staying on loopback.  ``fill`` is how many
    connects fill the queue (listen(0) holds one; more only make it surer).
    """

    def __init__(self, host: str = "127.0.0.1", fill: int = 8) -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.sockname = self.sock.getsockname()
        self.port = self.sockname[1]
        self.address = f"{host}:{self.port}"
        self.fillers: List[socket.socket] = []
        for _ in range(fill):  # fill the queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(self.sockname)
            self.fillers.append(filler)

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()

    def __enter__(self) -> "Blackhole":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    """A backend server in its own process that prints ``listening PORT`` once it accepts.

    A tests/backends.py ``mode``, or ``command`` as given (scripts/stalled_readers.py
    ``--serve-flood`` follows the same protocol).
    """

    def __init__(self, mode: str = "echo", name: str = "backend", *extra: str,
                 command: Optional[List[str]] = None) -> None:
        self.name = name
        argv = command or [sys.executable, str(HERE / "backends.py"), mode, "--name", name,
                           *extra]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"backend {' '.join(argv[1:])} did not start: {line!r}")
        words = line.split()
        self.port = int(words[1])
        # As a config names it: "127.0.0.1:P", "[::1]:P" (--host ::1), "unix:/path" (--unix).
        self.address = words[2] if len(words) > 2 else f"127.0.0.1:{self.port}"

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
                 env: Optional[dict] = None, command: Optional[List[str]] = None,
                 cwd: Optional[Path] = None, pass_fds: Iterable[int] = ()) -> None:
        """Run ``python -m prefork_proxy ARGS``, or ``command`` as given (e.g. the API);
        ``pass_fds`` are inherited by it (socket activation)."""
        self.pass_fds = tuple(pass_fds)
        self.args = command or [sys.executable, "-m", "prefork_proxy", *args]
        self.log_path = log_path
        self.listeners: List[str] = []
        self.process = self._spawn(preexec_fn, env, cwd)
        self.pid = self.process.pid
        if wait_ready:
            self.wait_ready()

    def _spawn(self, preexec_fn: Optional[Callable[[], None]], env: Optional[dict],
               cwd: Optional[Path]) -> subprocess.Popen:
        """Start the process, stdout and stderr to the log (conftest's xprocess one overrides)."""
        with open(self.log_path, "ab") as log_file:  # the child keeps its own copy
            return subprocess.Popen(self.args, stdout=log_file, stderr=subprocess.STDOUT,
                                    preexec_fn=preexec_fn, env=env, cwd=cwd,
                                    pass_fds=self.pass_fds)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 15.0) -> None:
        def ready() -> Optional[re.Match]:
            self.check_running()
            return self.READY.search(self.log)

        match = wait_for(ready, timeout, message="the proxy's ready line")
        self.listeners = match.group(2).split(",")

    def check_running(self) -> None:
        """Fail with the log when the proxy has already exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"proxy exited with {self.process.returncode}:\n{self.log}")

    def port(self, index: int = 0) -> int:
        return int(self.listeners[index].rsplit(":", 1)[1])

    def connect(self, index: int = 0, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port(index)), timeout=timeout)

    def worker_pids(self) -> List[int]:
        """The master's children but its admin and health-check processes (own titles)."""
        pids = []
        for pid in children_of(self.pid):
            try:
                if process_title(pid) in ("prefork-proxy: admin", "prefork-proxy: health"):
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

    def stop(self, timeout: float = 15.0, fast_after: Optional[float] = None) -> int:
        """SIGTERM (the drain), then after ``timeout`` SIGKILL the workers and the master.

        ``fast_after``: if the drain has not ended after this many seconds, send
        SIGQUIT (the fast stop) and wait for the rest of ``timeout``.  Fixture
        teardown uses it: a test that left a client open would otherwise wait
        out the whole drain.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                if fast_after is not None and fast_after < timeout:
                    try:
                        self.process.wait(fast_after)
                    except subprocess.TimeoutExpired:
                        self.process.send_signal(signal.SIGQUIT)
                        self.process.wait(timeout - fast_after)
                else:
                    self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def children_of(pid: int) -> List[int]:
    """Direct children of ``pid``, from /proc (needs CONFIG_PROC_CHILDREN, as on Debian)."""
    pids: List[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except (FileNotFoundError, ProcessLookupError):  # gone (or going: read after open)
        pass
    return sorted(pids)


def process_state(pid: int) -> Optional[str]:
    """The one-letter state in /proc/PID/stat (``Z`` for a zombie), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # ProcessLookupError: it was reaped between the open and the read (CI saw it
        # in test_pid1, waiting for an orphan to be reaped).
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
    """The title ``pid`` runs under, or "" once it has exited.

    Callers list pids and then read titles: a worker that exits in between (a
    retiring generation does exactly that) has no title, not an error.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


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


def connect_address(address: str, timeout: float = 10.0) -> socket.socket:
    """A client connected to ``address`` as the ready line or a config writes it:
    ``127.0.0.1:P``, ``[::1]:P`` or ``unix:/path``."""
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address[len("unix:"):])
        except OSError:
            sock.close()
            raise
        return sock
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)


def ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (IPv6 tests skip without it)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


class CountingEcho:
    """An echo server on loopback (a thread per connection) recording its current and peak
    connections and how many it accepted: a backend that shows whether a cap held.

    Used by test_backend_queue and test_listener_limit; threads are daemons.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.active = self.peak = self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # stop() closed the listening socket
                return
            with self.lock:
                self.accepted += 1
                self.active += 1
                self.peak = max(self.peak, self.active)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            # Count the connection gone before closing it: the proxy frees the slot
            # when it sees this close, and may connect the next client at once; a
            # decrement after close() could trail that accept and record one too many.
            with self.lock:
                self.active -= 1
            conn.close()

    def stop(self) -> None:
        self.sock.close()
