"""In-place upgrade (SIGUSR2) under load: a new program on disk takes over, nothing is lost.

The proxy runs from a copy of the package in a temporary directory (first on
PYTHONPATH), so the test can change the program on disk between upgrades: a
new ``__version__``, which the new master reports in its ``ready`` line and
status, or a broken program.  The load is scripts/chaos.py's: clients that
verify every byte, and one long stream opened before the first upgrade.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from support import ProxyProcess, children_of, process_title, wait_for

from prefork_proxy import control

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "prefork_proxy"


def _chaos():
    spec = importlib.util.spec_from_file_location("chaos_for_upgrade", ROOT / "scripts" /
                                                  "chaos.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chaos = _chaos()


class Program:
    """A copy of the package on disk, which the test edits between upgrades."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(PACKAGE, root / "prefork_proxy",
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.init = root / "prefork_proxy" / "__init__.py"
        self.original = self.init.read_text()

    def set_version(self, version: str, broken: bool = False) -> None:
        text = re.sub(r'^__version__ = ".*"$', f'__version__ = "{version}"', self.original,
                      flags=re.M)
        if broken:
            text += '\nraise ImportError("injected: this program is broken")\n'
        self.init.write_text(text)

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.root)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # each start compiles what is on disk now
        env["PYTHONSAFEPATH"] = "1"  # `-m` would put the checkout (the cwd) first otherwise
        return env


def _running(pid: int) -> bool:
    return control._running(pid)


def _master_in(pidfile: Path) -> int:
    """The pid in the pidfile once a live, locked master holds it."""
    try:
        return control.read_pid(str(pidfile))
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return 0


def _admin_status(port: int) -> Dict[str, object]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/status")
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def _build_info_versions(port: int) -> List[str]:
    """The ``version`` labels of ``prefork_proxy_build_info`` on the admin endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return [sample.labels["version"] for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "prefork_proxy_build_info"]


def _write_config(path: Path, backend: str, pidfile: Path, valid: bool = True) -> None:
    path.write_text(f"""
[server]
workers = 2
threads = 1
pidfile = "{pidfile}"
drain_timeout_s = 60

[admin]
bind = "127.0.0.1:0"

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{backend}"]
""" + ("" if valid else "\nthis is not TOML\n"))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python 3.11")
@pytest.mark.timeout(90)
def test_three_upgrades_under_load_lose_nothing_and_a_broken_one_changes_nothing(
        tmp_path, backend_factory):
    backend = backend_factory("echo")
    program = Program(tmp_path / "program")
    program.set_version("1.0.0")
    pidfile = tmp_path / "proxy.pid"
    config = tmp_path / "proxy.toml"
    _write_config(config, backend.address, pidfile)
    log_path = tmp_path / "proxy.log"
    first = ProxyProcess(["start", "--config", str(config)], log_path, env=program.env())
    masters: List[int] = [first.pid]
    try:
        assert "version=1.0.0" in first.log
        first.wait_workers(2)
        port = first.port()
        admin_port = int(re.search(r"admin endpoint listening on \S+:(\d+)", first.log)
                         .group(1))
        stop = threading.Event()
        tally = chaos.Tally()
        clients = [threading.Thread(target=chaos.client_loop, args=(port, stop, tally, seed),
                                    daemon=True) for seed in range(20)]
        for client in clients:
            client.start()
        stream = chaos.LongStream(port, stop)
        stream.start()
        wait_for(lambda: tally.ok >= 200 and stream.turns >= 3, 20, message="load running")

        handover_s: List[float] = []
        exit_s: List[float] = []
        for number, version in enumerate(["2.0.0", "3.0.0", "4.0.0"], 1):
            program.set_version(version)
            old = masters[-1]
            old_children = children_of(old)  # its workers and health process
            before = tally.ok
            started = time.monotonic()
            if number == 2:  # once through the CLI, as an operator would
                result = subprocess.run([sys.executable, "-m", "prefork_proxy", "upgrade",
                                         "--pidfile", str(pidfile)], capture_output=True,
                                        text=True, timeout=60, env=program.env())
                assert result.returncode == 0, result.stdout + result.stderr
                assert "handed over to master" in result.stdout
            else:
                os.kill(old, signal.SIGUSR2)
            new = wait_for(lambda old=old: (_master_in(pidfile) not in (0, old))
                           and _master_in(pidfile), 30, message="a new master in the pidfile")
            wait_for(lambda new=new, version=version: re.search(
                rf"upgrade: new master {new} \(version {version}\) is ready after", first.log), 30,
                     message=f"upgrade {number} ready")
            handover_s.append(time.monotonic() - started)
            assert re.search(rf"ready pid={new} listeners=127\.0\.0\.1:{port} .*"
                             rf"version={version}", first.log)
            masters.append(new)
            # The old master keeps PIDFILE.oldbin while it drains.
            status = control.read_status(str(pidfile))
            assert status["pid"] == new and status["version"] == version
            # The admin socket moved over too: same port, the new master's model, once
            # the old master's admin process (stopped at the hand-over) is gone.
            wait_for(lambda old=old: not [pid for pid in children_of(old)
                                          if process_title(pid) == "prefork-proxy: admin"],
                     10, message="the old admin process gone")
            model = _admin_status(admin_port)
            assert model["pid"] == new and model["version"] == version
            assert _build_info_versions(admin_port) == [version]
            if number > 1:  # (the first old master drains the long stream until the end)
                wait_for(lambda old=old: not _running(old), 30, message=f"old master {old} exits")
                exit_s.append(time.monotonic() - started)
                assert not [pid for pid in old_children if _running(pid)], \
                    "a process of the old version outlived its drain"
                assert f"master {old} exiting with code 0" in first.log
                # The control socket beside the pidfile is the new master's: the old
                # master's exit must not have removed it.
                listed = subprocess.run([sys.executable, "-m", "prefork_proxy", "backend",
                                         "list", "--pidfile", str(pidfile)],
                                        capture_output=True, text=True, timeout=30,
                                        env=program.env())
                assert listed.returncode == 0, listed.stdout + listed.stderr
            wait_for(lambda before=before: tally.ok >= before + 100, 20,
                     message="load through the new master")
            assert not tally.failures, tally.failures[:3]

        # A broken program on disk: an import error, then an invalid config.
        current = masters[-1]
        for breakage in ("import", "config"):
            if breakage == "import":
                program.set_version("5.0.0", broken=True)
            else:
                program.set_version("5.0.0")
                _write_config(config, backend.address, pidfile, valid=False)
            before = tally.ok
            failures_logged = first.log.count("upgrade failed:")
            os.kill(current, signal.SIGUSR2)
            wait_for(lambda seen=failures_logged: first.log.count("upgrade failed:") > seen, 30,
                     message=f"the {breakage} failure logged")
            wait_for(lambda: _master_in(pidfile) == current, 10,
                     message="the pidfile back with the serving master")
            assert not (tmp_path / "proxy.pid.oldbin").exists()
            wait_for(lambda before=before: tally.ok >= before + 100, 20,
                     message="load still served")
            assert _running(current)
        assert "injected: this program is broken" in first.log
        assert "exit code 2 before it was ready" in first.log  # the invalid config
        _write_config(config, backend.address, pidfile)

        assert stream.error is None and stream.turns > 0
        stop.set()
        for client in clients:
            client.join(20)
        stream.join(20)
        assert stream.error is None, stream.error
        # The long stream ended: the first master, which held it, finishes its drain.
        first.process.wait(20)
        assert first.process.returncode == 0
        print(f"\nupgrade figures: {tally.ok} connections, {len(tally.failures)} failed, "
              f"{tally.mismatched_bytes} mismatched bytes; long stream {stream.turns} turns, "
              f"{stream.bytes} bytes, byte-exact; USR2 -> new master ready: "
              f"{', '.join(f'{s:.2f}' for s in handover_s)} s; USR2 -> old master exited "
              f"(upgrades 2, 3): {', '.join(f'{s:.2f}' for s in exit_s)} s")
        assert not tally.failures, tally.failures[:3]
        assert tally.mismatched_bytes == 0
        assert tally.ok > 1000
    finally:
        for pid in masters[1:]:
            if _running(pid):
                os.kill(pid, signal.SIGTERM)
        for pid in masters[1:]:
            wait_for(lambda pid=pid: not _running(pid), 30, message=f"master {pid} stopped")
        first.stop()


def test_meaningless_signals_are_logged_and_ignored(backend_factory, proxy_factory):
    """Signals whose default action would kill the proxy but that mean nothing to it:
    the master logs each and serves on; a worker ignores them."""
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1")
    worker = proxy.wait_workers(1)[0]
    sent = [signal.SIGWINCH, signal.SIGALRM, signal.SIGPWR, signal.SIGVTALRM, signal.SIGXFSZ,
            signal.SIGRTMIN + 3]
    for signum in sent:
        os.kill(proxy.pid, signum)
        os.kill(worker, signum)
    names = ["SIGWINCH", "SIGALRM", "SIGPWR", "SIGVTALRM", "SIGXFSZ", "SIGRTMIN+3"]
    wait_for(lambda: all(f"{name} ignored" in proxy.log for name in names), 10,
             message="a log line for each signal")
    assert proxy.process.poll() is None and _running(worker)
    with proxy.connect() as sock:
        sock.sendall(b"still")
        assert sock.recv(5) == bytes(b ^ 0x5A for b in b"still")
    assert proxy.stop() == 0


#: Stands in for systemd: the socket at descriptor 3, LISTEN_FDS=1, LISTEN_PID=this pid,
#: then exec (the pid stays, as when systemd execs ExecStart).
_ACTIVATE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
             "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
             "os.execv(sys.executable, [sys.executable, '-m', 'prefork_proxy'] + sys.argv[2:])")


def test_socket_activation_adopts_the_socket_systemd_passes(backend_factory, tmp_path):
    """LISTEN_FDS: the listener bound by "systemd" (here without SO_REUSEPORT, so binding
    or probing the address again would fail) is adopted by address, and serves."""
    backend = backend_factory("echo")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = tmp_path / "proxy.toml"
    config.write_text(f'[server]\nworkers = 1\n[[tcp_proxy]]\nbind = "127.0.0.1:{port}"\n'
                      f'backends = ["{backend.address}"]\n')
    proxy = ProxyProcess([], tmp_path / "proxy.log", pass_fds=[sock.fileno()],
                         command=[sys.executable, "-c", _ACTIVATE, str(sock.fileno()),
                                  "start", "--config", str(config)])
    try:
        sock.close()  # the proxy's copy is the only one now
        assert proxy.port() == port
        with proxy.connect() as client:
            client.sendall(b"activated")
            assert client.recv(9) == bytes(b ^ 0x5A for b in b"activated")
        assert "address already in use" not in proxy.log
    finally:
        assert proxy.stop() == 0


@pytest.mark.timeout(90)
def test_an_upgrade_hands_over_a_unix_listener_and_only_the_last_master_removes_its_file(
        tmp_path, backend_factory):
    """The new master adopts the unix socket (same file, same queue); the old one,
    draining after the hand-over, leaves the file alone; the final stop removes it."""
    backend = backend_factory("echo")
    path = tmp_path / "front.sock"
    pidfile = tmp_path / "proxy.pid"
    config = tmp_path / "proxy.toml"
    config.write_text(f"""
[server]
workers = 2
pidfile = "{pidfile}"

[[tcp_proxy]]
bind = "unix:{path}"
backends = ["{backend.address}"]
""")

    def echo(sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(len(data) - len(got))
            assert chunk, "closed early"
            got += chunk
        assert got == bytes(b ^ 0x5A for b in data)

    def client() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(path))
        return sock

    first = ProxyProcess(["start", "--config", str(config)], tmp_path / "proxy.log")
    new = 0
    try:
        first.wait_workers(2)
        inode = os.lstat(path).st_ino
        before = client()  # opened before the upgrade, served by the old master's worker
        echo(before, b"before")
        os.kill(first.pid, signal.SIGUSR2)
        new = wait_for(lambda: (_master_in(pidfile) not in (0, first.pid))
                       and _master_in(pidfile), 30, message="a new master in the pidfile")
        wait_for(lambda: f"upgrade: new master {new} " in first.log, 30,
                 message="the upgrade ready")
        assert re.search(rf"ready pid={new} listeners=unix:{re.escape(str(path))} ", first.log)
        echo(before, b"still")
        before.close()
        wait_for(lambda: not _running(first.pid), 30, message="the old master exits")
        assert first.process.wait(5) == 0
        assert os.lstat(path).st_ino == inode, "the old master left the handed-over file"
        with client() as after:  # the same socket, now the new master's
            echo(after, b"after")
        os.kill(new, signal.SIGTERM)
        wait_for(lambda: not _running(new), 30, message="the new master stops")
        assert not path.exists(), "the last master's final stop removes the file"
    finally:
        for pid in (new, first.pid):
            if pid and _running(pid):
                os.kill(pid, signal.SIGKILL)
