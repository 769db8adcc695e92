"""Listeners and control files: what the config says is exactly what is bound.

The real CLI with config files and SIGHUP: a listener removed by a reload
stops being bound once its last worker is gone (refused, bindable by anyone),
one added back serves every client at once; a second instance can neither
take over a pidfile nor silently share a port; ``stop`` never signals a
stranger; with ``user``, the status file and the pidfile's removal work.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import List, Optional

import pytest
from support import ProxyProcess, alive, free_port, process_title, recv_exactly, transform, wait_for


def _write(path: Path, binds: List[str], backend: str, *, workers: int = 2, server: str = "",
           listener: str = "") -> Path:
    sections = "".join(textwrap.dedent(f"""
        [[tcp_proxy]]
        bind = "{bind}"
        backends = ["{backend}"]
        {listener}
    """) for bind in binds)
    path.write_text(f"[server]\nworkers = {workers}\n{server}\n{sections}")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", *args], capture_output=True,
                          text=True, timeout=60)


def _generation(proxy: ProxyProcess, generation: int) -> List[int]:
    return [pid for pid in proxy.worker_pids()
            if process_title(pid).endswith(f"gen {generation}")]


def _reload(proxy: ProxyProcess, generation: int) -> None:
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: f"generation {generation} serves" in proxy.log,
             message=f"generation {generation} to serve")


def _connect_outcome(port: int) -> str:
    """"refused", "timeout" (a SYN dropped by a filtered listener) or "open"."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"


def _round_trips(port: int, count: int) -> int:
    """Connect ``count`` times, one round trip each; the number that relayed exactly.

    A connect that hangs (a client hashed to a filtered SO_REUSEPORT twin)
    costs its 1 s timeout; after 5 failures the rest are not tried.
    """
    ok = failed = 0
    for number in range(count):
        if failed >= 5:
            break
        message = f"client {number}".encode()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == transform(message)
            ok += 1
        except OSError:
            failed += 1
    return ok


def _bindable_without_reuseport(port: int) -> bool:
    with socket.socket() as other:  # another program: no SO_REUSEPORT
        try:
            other.bind(("127.0.0.1", port))
            other.listen(1)
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------- D1


def test_removed_listener_is_unbound_and_a_readded_one_serves_every_client(
        backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    kept, removed = free_port(), free_port()
    both = [f"127.0.0.1:{kept}", f"127.0.0.1:{removed}"]
    config = _write(tmp_path / "proxy.toml", both, echo.address)
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    assert _round_trips(removed, 3) == 3

    _write(config, both[:1], echo.address)
    _reload(proxy, 2)
    wait_for(lambda: not _generation(proxy, 1), 15, message="generation 1 to exit")
    # Refused, not silently dropped: no process holds the socket any more
    # (a generation-2 worker that inherited it through fork would).
    # (The master closes it once it has reaped the last generation-1 worker.)
    wait_for(lambda: _connect_outcome(removed) == "refused", 6,
             message="connects to the removed port to be refused")
    assert _bindable_without_reuseport(removed)
    assert _round_trips(kept, 3) == 3

    _write(config, both, echo.address)
    _reload(proxy, 3)
    wait_for(lambda: not _generation(proxy, 2), 15, message="generation 2 to exit")
    assert _round_trips(removed, 100) == 100


def test_listener_readded_while_the_old_generation_drains_serves_every_client(
        backend_factory, proxy_factory, tmp_path):
    """Re-added before the filtered socket could close: it must be that very socket
    again, not a fresh one in its SO_REUSEPORT group (half the clients would hang)."""
    echo = backend_factory("echo")
    kept, removed = free_port(), free_port()
    both = [f"127.0.0.1:{kept}", f"127.0.0.1:{removed}"]
    config = _write(tmp_path / "proxy.toml", both, echo.address, server="drain_timeout_s = 60")
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(2)
    held = socket.create_connection(("127.0.0.1", kept), timeout=5)  # keeps gen 1 draining
    held.sendall(b"x")
    assert recv_exactly(held, 1) == transform(b"x")

    _write(config, both[:1], echo.address, server="drain_timeout_s = 60")
    _reload(proxy, 2)
    assert _connect_outcome(removed) != "open"
    _write(config, both, echo.address, server="drain_timeout_s = 60")
    _reload(proxy, 3)
    assert _generation(proxy, 1), "generation 1 should still be draining the held stream"
    assert _round_trips(removed, 100) == 100
    held.sendall(b"y")
    assert recv_exactly(held, 1) == transform(b"y")
    held.close()


# --------------------------------------------------------------------------- D2


def test_second_start_on_the_same_pidfile_exits_1(backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    pidfile = tmp_path / "proxy.pid"
    server = f'pidfile = "{pidfile}"'
    first = proxy_factory("start", "--config",
                          str(_write(tmp_path / "a.toml", ["127.0.0.1:0"], echo.address,
                                     workers=1, server=server)))
    first.wait_workers(1)
    second = _cli("start", "--config", str(_write(tmp_path / "b.toml", ["127.0.0.1:0"],
                                                  echo.address, workers=1, server=server)))
    assert second.returncode == 1, second.stderr
    assert (f"{pidfile}: another prefork-proxy master (pid {first.pid}) is running with this "
            "pidfile") in second.stderr
    assert " ready pid=" not in second.stderr
    assert pidfile.read_text().strip() == str(first.pid)  # neither overwritten nor removed
    wait_for(lambda: f"master pid {first.pid}" in _cli("status", "--pidfile",
                                                        str(pidfile)).stdout,
             message="status to reach the first master")


@pytest.mark.parametrize("spelling", ["127.0.0.1", "localhost"])
def test_second_instance_on_a_port_in_use_exits_1(spelling, backend_factory, proxy_factory,
                                                  tmp_path):
    echo = backend_factory("echo")
    port = free_port()
    first = proxy_factory("start", "--config",
                          str(_write(tmp_path / "a.toml", [f"127.0.0.1:{port}"], echo.address,
                                     workers=1)))
    first.wait_workers(1)
    second = _cli("start", "--config", str(_write(tmp_path / "b.toml", [f"{spelling}:{port}"],
                                                  echo.address, workers=1)))
    assert second.returncode == 1, second.stderr
    assert (f"cannot bind {spelling}:{port}: address already in use: another process "
            f"listens on 127.0.0.1:{port}") in second.stderr
    assert " ready pid=" not in second.stderr
    assert _round_trips(port, 10) == 10


def test_reuse_port_opts_in_to_sharing(backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    port = free_port()
    first = proxy_factory("start", "--config",
                          str(_write(tmp_path / "a.toml", [f"127.0.0.1:{port}"], echo.address,
                                     workers=1)))
    first.wait_workers(1)
    second = proxy_factory("start", "--config",
                           str(_write(tmp_path / "b.toml", [f"127.0.0.1:{port}"], echo.address,
                                      workers=1, listener="reuse_port = true")))
    second.wait_workers(1)
    assert _round_trips(port, 10) == 10


def test_reload_respelling_an_address_keeps_its_socket(backend_factory, proxy_factory,
                                                       tmp_path):
    """``127.0.0.1:P`` -> ``localhost:P`` is the same address: kept, not "in use"."""
    echo = backend_factory("echo")
    port = free_port()
    config = _write(tmp_path / "proxy.toml", [f"127.0.0.1:{port}"], echo.address, workers=1)
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    _write(config, [f"localhost:{port}"], echo.address, workers=1)
    _reload(proxy, 2)
    assert _round_trips(port, 10) == 10


# --------------------------------------------------------------------------- H2


def test_stop_refuses_a_stale_pidfile_naming_an_unrelated_process(tmp_path):
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "proxy.pid"
        pidfile.write_text(f"{stranger.pid}\n")
        for command in (("stop", "--timeout", "5"), ("reload",)):
            result = _cli(*command, "--pidfile", str(pidfile))
            assert result.returncode == 1
            assert (f"{pidfile}: stale pidfile: no prefork-proxy master holds its lock, so "
                    f"process {stranger.pid} is not this proxy's master") in result.stderr
        assert stranger.poll() is None and alive(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait(5)


# --------------------------------------------------------------------------- H1


def _nobody() -> Optional[pwd.struct_passwd]:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.fixture
def world_dir():
    """A directory every user can traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="prefork-proxy-h1-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(_nobody() is None, reason="no user \"nobody\" on this machine")
def test_status_and_pidfile_work_after_dropping_to_a_user(backend_factory, proxy_factory,
                                                          tmp_path, world_dir):
    nobody = _nobody()
    assert nobody is not None
    echo = backend_factory("echo")
    pidfile = world_dir / "run" / "proxy.pid"  # its directory is missing: created for nobody
    config = _write(tmp_path / "proxy.toml", ["127.0.0.1:0"], echo.address, workers=1,
                    server=f'pidfile = "{pidfile}"\nuser = "nobody"')
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    assert (pidfile.parent.stat().st_uid, pidfile.parent.stat().st_gid) == \
        (nobody.pw_uid, nobody.pw_gid)
    wait_for(lambda: _cli("status", "--pidfile", str(pidfile)).returncode == 0, 10,
             message="a healthy status written by the unprivileged master")
    assert "cannot write the status file" not in proxy.log
    assert proxy.stop() == 0
    assert not pidfile.exists()
    assert not Path(f"{pidfile}.status.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.skipif(_nobody() is None, reason="no user \"nobody\" on this machine")
def test_pidfile_where_the_user_cannot_write_fails_the_start(backend_factory, tmp_path,
                                                             world_dir):
    echo = backend_factory("echo")
    pidfile = world_dir / "proxy.pid"  # root's 0755 directory: nobody cannot write there
    config = _write(tmp_path / "proxy.toml", ["127.0.0.1:0"], echo.address, workers=1,
                    server=f'pidfile = "{pidfile}"\nuser = "nobody"')
    result = _cli("start", "--config", str(config))
    assert result.returncode == 1
    assert f"{world_dir}: user nobody cannot create and remove files here" in result.stderr
    assert not pidfile.exists()
