"""``prefork-proxy backend``: drain, disable and enable a backend at run time.

Real proxy (2 workers), two tag backends, a client loop in a thread that
keeps opening connections and checks every byte; the commands go through
the real CLI and the master's control socket.  What the operator relies on:
within 100 ms of the command's answer no new connection reaches a drained
backend, an open one keeps working byte-exact, disable holds against passing
health checks, and the state survives a worker SIGKILL and a reload.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import List, Tuple

import pytest
from support import free_port, process_title, recv_exactly, transform, wait_for, write_config

#: Connections that start later than this after the command's answer must obey it.
EFFECT_S = 0.1


class Load:
    """Connections one after another, each checked byte-exact: (start time, tag) of each."""

    def __init__(self, port: int, limit: int = 50_000, seconds: float = 60.0) -> None:
        self.port = port
        self.seen: List[Tuple[float, str]] = []
        self.errors: List[Tuple[float, str]] = []  # (start time, what went wrong)
        self.stop = threading.Event()
        self.limit, self.deadline = limit, time.monotonic() + seconds
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        payload = b"ping-0123456789\n"
        for _ in range(self.limit):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    reader = sock.makefile("rb")
                    tag = reader.readline().decode().strip()
                    sock.sendall(payload)
                    if reader.read(len(payload)) != transform(payload):
                        self.errors.append((started, f"bytes differ through {tag!r}"))
                        continue
            except OSError as exc:
                self.errors.append((started, f"{type(exc).__name__}: {exc}"))
                continue
            self.seen.append((started, tag))

    def since(self, moment: float) -> List[str]:
        return [tag for started, tag in list(self.seen) if started >= moment]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", *args], capture_output=True,
                          text=True, timeout=30)


def _config(path, pidfile, a, b, port, comment=""):
    return write_config(path, textwrap.dedent(f"""
        # {comment}
        [server]
        workers = 2
        pidfile = "{pidfile}"

        [[tcp_proxy]]
        name = "web"
        bind = "127.0.0.1:{port}"
        backends = ["{a}", "{b}"]
        health_check = {{ interval_ms = 50, rise = 1, fall = 1 }}
    """))


def _workers(proxy) -> List[int]:
    """The worker pids (not the health-check process, which these configs also run)."""
    pids = []
    for pid in proxy.worker_pids():
        try:
            if "worker" in process_title(pid):
                pids.append(pid)
        except OSError:
            continue
    return pids


def _booted(proxy, count: int = 2) -> List[int]:
    return wait_for(lambda: len(_workers(proxy)) == count
                    and all(f"pid={pid} " in proxy.log for pid in _workers(proxy))
                    and _workers(proxy), message=f"{count} booted workers")



def _connect_to(port: int, tag: str) -> socket.socket:
    """A connection that landed on ``tag`` (round robin: a few tries at most)."""
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if sock.makefile("rb").readline().decode().strip() == tag:
            return sock
        sock.close()
    raise AssertionError(f"no connection reached {tag}")


def _turn(sock: socket.socket, size: int = 65536) -> None:
    message = os.urandom(size)
    sock.sendall(message)
    assert recv_exactly(sock, size) == transform(message)


def _act(pidfile, backend, action) -> float:
    result = _cli("backend", "--pidfile", str(pidfile), "web", backend, action)
    assert result.returncode == 0, result.stderr
    return time.monotonic()  # the master has answered: the state is in shared memory


def test_drain_disable_enable_under_load(backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port, pidfile = free_port(), tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", pidfile, a.address, b.address, port)
    proxy = proxy_factory("start", "--config", str(config))
    _booted(proxy)

    sock_path = f"{pidfile}.sock"
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)

    held = _connect_to(port, "B")  # open before the drain, used after it
    _turn(held)
    load = Load(port)
    try:
        wait_for(lambda: {"A", "B"} <= set(load.since(0)), message="load on both backends")

        drained_at = _act(pidfile, b.address, "drain")
        wait_for(lambda: len(load.since(drained_at + EFFECT_S)) >= 50, 15,
                 message="connections after the drain")
        assert set(load.since(drained_at + EFFECT_S)) == {"A"}
        late = [s - drained_at for s, tag in load.seen if tag == "B" and s >= drained_at]
        print(f"drain: {len(late)} connection(s) to B started after the command's answer"
              + (f", the last {max(late) * 1000:.1f} ms after it" if late else ""))
        for _ in range(20):  # the open connection to B still relays every byte
            _turn(held)
        listing = _cli("backend", "--pidfile", str(pidfile), "list")
        assert listing.returncode == 0, listing.stderr
        row = [line for line in listing.stdout.splitlines() if b.address in line]
        assert row and "drain" in row[0], listing.stdout

        disabled_at = _act(pidfile, b.address, "disable")
        # Health checks keep passing (B answers them): status shows a fresh passing
        # check after the disable, and still nothing new reaches B.
        def checked_after_disable() -> bool:
            status = _cli("status", "--pidfile", str(pidfile)).stdout
            lines = [line for line in status.splitlines() if b.address in line]
            return bool(lines) and "disabled" in lines[0] and "ok" in lines[0] \
                and len(load.since(disabled_at + 1.0)) >= 20
        wait_for(checked_after_disable, 15, message="a passing check while disabled")
        assert set(load.since(drained_at + EFFECT_S)) == {"A"}
        for _ in range(5):  # still byte-exact, then closed by its client
            _turn(held)
        held.close()

        # A worker SIGKILLed and respawned reads the same shared state.
        victim = _workers(proxy)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in _workers(proxy) and len(_booted(proxy)) == 2,
                 message="the respawn")
        respawned_at = time.monotonic()
        wait_for(lambda: len(load.since(respawned_at + 0.5)) >= 20, message="load after respawn")

        # A reload keeps the state of a backend that stays.
        _config(config, pidfile, a.address, b.address, port, comment="reloaded")
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: "generation 2 serves" in proxy.log, 15, message="the reload")
        reloaded_at = time.monotonic()
        wait_for(lambda: len(load.since(reloaded_at + 0.5)) >= 20, message="load after reload")
        assert set(load.since(drained_at + EFFECT_S)) == {"A"}
        listing = _cli("backend", "--pidfile", str(pidfile), "list").stdout
        assert [line for line in listing.splitlines() if b.address in line and "disabled" in line]

        enabled_at = _act(pidfile, b.address, "enable")
        wait_for(lambda: "B" in load.since(enabled_at), message="B back in rotation")
        back = min(s for s, tag in load.seen if tag == "B" and s >= enabled_at) - enabled_at
        print(f"enable: first connection to B {back * 1000:.1f} ms after the answer")
        assert back <= EFFECT_S + 0.2
        _turn(_connect_to(port, "B"))
    finally:
        load.close()
        held.close()
    # The one connection the SIGKILLed worker held may be cut (that is what SIGKILL
    # does); every other one was byte-exact.
    cut = [error for started, error in load.errors if killed_at - 0.5 <= started <= respawned_at]
    assert len(cut) <= 1, cut
    assert len(load.errors) == len(cut), load.errors[:5]
    print(f"{len(load.seen)} connections checked, {len(cut)} cut by the SIGKILL")


def test_unknown_listener_or_backend_exits_2(backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port, pidfile = free_port(), tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", pidfile, a.address, b.address, port)
    proxy = proxy_factory("start", "--config", str(config))
    _booted(proxy)
    result = _cli("backend", "--pidfile", str(pidfile), "nope", b.address, "drain")
    assert result.returncode == 2
    assert "no listener 'nope'" in result.stderr and "web" in result.stderr
    result = _cli("backend", "--config", str(config), "web", "127.0.0.1:1", "disable")
    assert result.returncode == 2
    assert "has no backend '127.0.0.1:1'" in result.stderr and b.address in result.stderr
    result = _cli("backend", "--pidfile", str(pidfile), "web", b.address, "explode")
    assert result.returncode == 2 and "expected `list`" in result.stderr
    listing = _cli("backend", "--pidfile", str(pidfile), "list")
    assert listing.returncode == 0
    assert listing.stdout.count("ready") == 2, listing.stdout  # nothing changed


def test_a_drain_ends_with_a_comeback_a_disable_does_not(backend_factory, proxy_factory,
                                                        tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port, pidfile = free_port(), tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", pidfile, a.address, b.address, port)
    proxy = proxy_factory("start", "--config", str(config))
    _booted(proxy)

    def state_of_b() -> str:
        listing = _cli("backend", "--pidfile", str(pidfile), "list").stdout
        return [line for line in listing.splitlines() if b.address in line][0].split()[2]

    def restart_b():
        b.stop()  # checks (every 50 ms, fall 1) mark it down
        wait_for(lambda: f"backend {b.address} down" in proxy.log[mark:],
                 message="B marked down")
        return backend_factory("tag", "B", "--port", str(b.port))

    mark = len(proxy.log)
    _act(pidfile, b.address, "disable")
    b2 = restart_b()
    wait_for(lambda: f"backend {b.address} up" in proxy.log[mark:], message="B back up")
    assert state_of_b() == "disabled"
    for _ in range(6):  # up by its checks, and still out of rotation
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert sock.makefile("rb").readline() == b"A\n"

    mark = len(proxy.log)
    _act(pidfile, b.address, "drain")
    b = b2
    restart_b()
    wait_for(lambda: state_of_b() == "ready", message="the drain to end at the comeback")
    assert "its drain ends" in proxy.log[mark:]
    _connect_to(port, "B").close()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_the_control_socket_belongs_to_the_serving_user(backend_factory, proxy_factory,
                                                        tmp_path):
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port = free_port()
    top = tempfile.mkdtemp(prefix="pp-ctl-")  # reachable by nobody (pytest's dirs are 0700)
    try:
        os.chmod(top, 0o755)
        pidfile = os.path.join(top, "run", "proxy.pid")  # the master creates run/ for nobody
        config = _config(tmp_path / "proxy.toml", pidfile, a.address, b.address, port)
        config.write_text(config.read_text().replace("workers = 2", 'workers = 2\nuser = "nobody"'))
        proxy = proxy_factory("start", "--config", str(config))
        _booted(proxy)
        info = os.stat(f"{pidfile}.sock")
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (nobody.pw_uid, 0o600)
        # root may use it (SO_PEERCRED: uid 0); nobody else but the serving user
        _act(pidfile, b.address, "drain")
        other = subprocess.run(
            [sys.executable, "-c", "import os, socket; os.setgid(65534); os.setuid(1); "
             f"socket.socket(socket.AF_UNIX).connect({pidfile + '.sock'!r})"],
            capture_output=True, text=True, timeout=30)
        assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr
        proxy.stop()
    finally:
        shutil.rmtree(top, ignore_errors=True)
