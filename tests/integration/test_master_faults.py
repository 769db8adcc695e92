"""Unplanned faults never take the master down, and a reload is a transaction.

Faults are injected deterministically in the real processes through
``prefork_proxy.faults`` (a file named after a step in the directory that
``PREFORK_PROXY_TEST_FAULTS`` names makes that step raise), or made real
(a log path that became a directory, threads past a 1 GiB address space, a
master killed with SIGKILL).  The promise checked after each one: the same
workers keep relaying byte-exact, and the master goes on supervising.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from support import (
    ProxyProcess,
    accepts,
    alive,
    children_of,
    free_port,
    process_title,
    recv_exactly,
    transform,
    wait_for,
    write_config,
)


def _config(path: Path, backend: str, *, workers: int = 2, server: str = "",
            listener: str = "", bind: str = "127.0.0.1:0", extra: str = "") -> Path:
    return write_config(path, textwrap.dedent(f"""
        [server]
        workers = {workers}
        {server}

        [[tcp_proxy]]
        bind = "{bind}"
        backends = ["{backend}"]
        {listener}
    """) + textwrap.dedent(extra))


def _fault_env(directory: Path) -> dict:
    directory.mkdir(exist_ok=True)
    return dict(os.environ, PREFORK_PROXY_TEST_FAULTS=str(directory))


def _workers(proxy: ProxyProcess, generation: int = 0) -> list:
    """The master's worker children (not its health-check process), of one generation or all."""
    pids = []
    for pid in children_of(proxy.pid):
        try:
            title = process_title(pid)
        except FileNotFoundError:
            continue
        if "worker" in title and (not generation or title.endswith(f" gen {generation}")):
            pids.append(pid)
    return sorted(pids)


def _booted_workers(proxy: ProxyProcess, count: int, log: callable, generation: int = 0,
                    timeout: float = 10.0) -> list:
    def booted():
        pids = _workers(proxy, generation)
        text = log()
        return len(pids) == count and all(f"pid={pid} " in text for pid in pids) and pids

    return wait_for(booted, timeout, message=f"{count} booted workers")


def _round_trip(port: int, size: int = 65536) -> None:
    message = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(message)
        assert recv_exactly(sock, size) == transform(message)


def _holder(sock: socket.socket, pids: list) -> int:
    """Which of ``pids`` holds the proxy's end of the client connection ``sock``."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == server_port and \
                    int(remote.split(":")[1], 16) == client_port:
                inode = fields[9]
    assert inode is not None, "the proxy's end of the connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process of {pids} holds the connection")


class Stream:
    """A long-lived connection that keeps exchanging checked bytes through the proxy."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def turn(self) -> None:
        message = os.urandom(4096)
        self.sock.sendall(message)
        assert recv_exactly(self.sock, len(message)) == transform(message)

    def close(self) -> None:
        self.sock.close()


def _status(pidfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", "status", "--pidfile",
                           str(pidfile)], capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- A: the loop


def test_an_error_in_each_loop_step_is_logged_and_the_loop_goes_on(backend_factory,
                                                                   proxy_factory, tmp_path):
    echo = backend_factory("echo")
    faults = tmp_path / "faults"
    pidfile = tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", echo.address, server=f'pidfile = "{pidfile}"')
    proxy = proxy_factory("start", "--config", str(config), env=_fault_env(faults))
    workers = _booted_workers(proxy, 2, lambda: proxy.log)
    stream = Stream(proxy.port())
    stream.turn()
    steps = ("signal", "reap", "supervise", "reload_progress", "manage_workers",
             "close_sockets", "health", "write_status")
    for step in steps:
        (faults / f"master.{step}").touch()
    proxy.signal(signal.SIGTTIN)  # its handling step raises: the signal is lost, not the master
    wait_for(lambda: not any(faults.iterdir()), message="every injected fault to trip")
    wait_for(lambda: all(f"unexpected error in {step}; the master goes on" in proxy.log
                         for step in steps), message="one logged error per step")
    assert proxy.log.count("Traceback") >= len(steps)
    assert proxy.process.poll() is None and _workers(proxy) == workers
    stream.turn()
    stream.close()
    _round_trip(proxy.port())
    # Still supervising: a killed worker is replaced, a signal is handled.
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: workers[0] not in _workers(proxy) and len(_workers(proxy)) == 2,
             message="the killed worker's replacement")
    proxy.signal(signal.SIGTTIN)
    wait_for(lambda: "SIGTTIN: workers 2 -> 3" in proxy.log, message="SIGTTIN handled")
    _booted_workers(proxy, 3, lambda: proxy.log)
    wait_for(lambda: _status(pidfile).returncode == 0, message="a healthy status")
    _round_trip(proxy.port())


# --------------------------------------------------------------------------- A: SIGUSR1


def test_usr1_with_a_log_path_that_became_a_directory_keeps_everything_serving(
        backend_factory, proxy_factory, tmp_path):
    """Master, workers and the health-check process log the error to the old file."""
    echo = backend_factory("echo")
    log_file = tmp_path / "proxy.log"
    config = _config(tmp_path / "proxy.toml", echo.address, server=f'log_file = "{log_file}"',
                     extra="""
        [tcp_proxy.health_check]
        interval_ms = 200
    """)
    proxy = proxy_factory("start", "--config", str(config), wait_ready=False)

    def log() -> str:
        return log_file.read_text(errors="replace") if log_file.is_file() else \
            (tmp_path / "proxy.log.1").read_text(errors="replace")

    wait_for(lambda: log_file.exists() and "ready pid=" in log(), message="ready in the log")
    port = int(log().split("listeners=127.0.0.1:", 1)[1].split()[0])
    workers = _booted_workers(proxy, 2, log)
    health = wait_for(lambda: [p for p in children_of(proxy.pid)
                               if process_title(p) == "prefork-proxy: health"],
                      message="the health-check process")
    os.rename(log_file, tmp_path / "proxy.log.1")
    log_file.mkdir()  # the path can no longer be opened as a file
    proxy.signal(signal.SIGUSR1)
    line = f"cannot reopen the log file {log_file}: Is a directory"
    # Master, two workers, and the health-check process (which follows the path itself).
    wait_for(lambda: log().count(line) >= 4, message="four processes to log the error")
    assert "SIGUSR1: log files reopened" in log()
    for _ in range(3):
        _round_trip(port)
    assert proxy.process.poll() is None
    assert _workers(proxy) == workers and all(alive(pid) for pid in health)
    assert "crashed" not in log()
    # The health-check process reports it once, not on every turn (it turns every
    # 0.2 s here): a window in which nothing may happen.
    count = log().count(line)
    window_end = time.monotonic() + 1.0
    while time.monotonic() < window_end:
        assert log().count(line) == count
        time.sleep(0.1)
    # Once the path is a file again, the next SIGUSR1 moves everyone to it.
    log_file.rmdir()
    proxy.signal(signal.SIGUSR1)
    wait_for(lambda: log_file.is_file() and "log files reopened" in log_file.read_text(),
             message="the master on the new file")


def test_an_error_handling_a_signal_in_a_worker_keeps_its_connections(backend_factory,
                                                                      proxy_factory, tmp_path):
    echo = backend_factory("echo")
    faults = tmp_path / "faults"
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "1", env=_fault_env(faults))
    [worker] = _booted_workers(proxy, 1, lambda: proxy.log)
    stream = Stream(proxy.port())
    stream.turn()
    (faults / "worker.signal").touch()
    proxy.signal(signal.SIGUSR1)  # the master passes it on to the worker
    wait_for(lambda: "worker 0: unexpected error handling SIGUSR1; going on" in proxy.log,
             message="the worker's logged error")
    stream.turn()
    _round_trip(proxy.port())
    assert _workers(proxy) == [worker]
    stream.close()


# --------------------------------------------------------------------------- A: fork fails


def test_fork_failures_are_retried_with_backoff_and_the_workers_keep_serving(
        backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    faults = tmp_path / "faults"
    pidfile = tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", echo.address,
                     server=f'pidfile = "{pidfile}"', extra="""
        [tcp_proxy.health_check]
        interval_ms = 200
    """)
    proxy = proxy_factory("start", "--config", str(config), env=_fault_env(faults))
    workers = _booted_workers(proxy, 2, lambda: proxy.log)
    stream = Stream(proxy.port())
    stream.turn()
    survivor = _holder(stream.sock, workers)
    [victim] = set(workers) - {survivor}

    # A respawn cannot fork: retried with growing delays; the other worker serves.
    (faults / "master.fork.always").touch()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: proxy.log.count("cannot fork worker") >= 3, message="three fork attempts")
    delays = [float(line.rsplit("retrying in ", 1)[1].split()[0])
              for line in proxy.log.splitlines() if "cannot fork worker" in line]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    assert proxy.process.poll() is None and _workers(proxy) == [survivor]
    stream.turn()
    _round_trip(proxy.port())

    # A reload that cannot fork its generation keeps the old one serving.
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving generation 1 with the old config: cannot "
                     "start worker" in proxy.log, message="the reload to be rolled back")
    assert _workers(proxy) == [survivor]
    _round_trip(proxy.port())

    # The health-check process cannot be forked again: logged, retried, then restarted.
    [health] = [p for p in children_of(proxy.pid) if process_title(p) == "prefork-proxy: health"]
    (faults / "health.fork").touch()
    os.kill(health, signal.SIGKILL)
    wait_for(lambda: "cannot fork the health-check process" in proxy.log, 5,
             message="the failed health fork")
    (faults / "master.fork.always").unlink()
    wait_for(lambda: [p for p in children_of(proxy.pid) if p != health
                      and process_title(p) == "prefork-proxy: health"], 10,
             message="the health-check process back")
    _booted_workers(proxy, 2, lambda: proxy.log, timeout=15)
    stream.turn()
    stream.close()
    assert proxy.process.poll() is None
    status = json.loads((tmp_path / "proxy.pid.status.json").read_text())
    assert status["generation"] == 1


# --------------------------------------------------------------------------- B: reload


def _small_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_reload_whose_workers_cannot_boot_keeps_the_old_generation_and_config(
        backend_factory, proxy_factory, tmp_path):
    """256 relay threads do not fit in 1 GiB of address space (see test_lifecycle)."""
    echo, tag = backend_factory("echo"), backend_factory("tag", "NEW")
    pidfile = tmp_path / "proxy.pid"
    port, added = free_port(), free_port()
    server = f'pidfile = "{pidfile}"\nworker_timeout_s = 5'  # the shortest allowed
    config = _config(tmp_path / "proxy.toml", echo.address, server=server,
                     bind=f"127.0.0.1:{port}")
    proxy = proxy_factory("start", "--config", str(config), preexec_fn=_small_address_space)
    old = _booted_workers(proxy, 2, lambda: proxy.log)
    stream = Stream(port)
    stream.turn()

    # New backend, a new listener, and threads that cannot start.
    _config(config, tag.address, server=server + "\nthreads = 256", bind=f"127.0.0.1:{port}",
            extra=f"""
        [[tcp_proxy]]
        bind = "127.0.0.1:{added}"
        backends = ["{tag.address}"]
    """)
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving generation 1 with the old config" in
             proxy.log, 15, message="the reload to fail")
    assert proxy.process.poll() is None
    assert _workers(proxy, 1) == old
    for _ in range(5):  # the old config: the echo backend, byte-exact
        _round_trip(port)
    stream.turn()
    shown = wait_for(lambda: (lambda r: r.returncode == 0 and "FAILED" in r.stdout and r.stdout)(
        _status(pidfile)), message="status to show the failed reload")
    assert "still serving generation 1 with the old config" in shown
    assert "generation 2" in shown  # which generation failed, and why
    # The failed generation is gone, and with it the listener only it had.
    wait_for(lambda: not _workers(proxy, 2), 10, message="the failed generation to exit")
    wait_for(lambda: not accepts(added), 10, message=f"port {added} to be closed")

    # The rollback left a consistent master: a good reload still works.
    _config(config, tag.address, server=server, bind=f"127.0.0.1:{port}")
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: generation 3 serves" in proxy.log, 15,
             message="the next reload")
    wait_for(lambda: proxy.log.count(" gen 1: stopped accepting") == 2,
             message="generation 1 to stop accepting")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.makefile("rb").readline().strip() == b"NEW"
    stream.turn()  # held by generation 1, which drains
    stream.close()


def test_reload_that_fails_after_reconfiguring_shared_state_is_rolled_back(
        backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    faults = tmp_path / "faults"
    config = _config(tmp_path / "proxy.toml", a.address)
    proxy = proxy_factory("start", "--config", str(config), env=_fault_env(faults))
    old = _booted_workers(proxy, 2, lambda: proxy.log)
    _config(config, b.address)
    (faults / "master.reload").touch()  # raises right after shared.reconfigure
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving generation 1 with the old config: "
                     "unexpected error" in proxy.log, message="the reload to fail")
    assert "Traceback" in proxy.log and _workers(proxy) == old

    def tag() -> bytes:
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=5) as sock:
            return sock.makefile("rb").readline().strip()

    assert {tag() for _ in range(6)} == {b"A"}
    # A respawned worker is built from the restored shared state: still the old backend.
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: old[0] not in _workers(proxy), message="the killed worker to go")
    _booted_workers(proxy, 2, lambda: proxy.log)
    assert {tag() for _ in range(6)} == {b"A"}
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: generation 3 serves" in proxy.log, message="the next reload")
    wait_for(lambda: proxy.log.count(" gen 1: stopped accepting") == 2,
             message="generation 1 to stop accepting")
    assert {tag() for _ in range(6)} == {b"B"}


def test_old_generation_retires_only_once_the_new_one_has_booted(backend_factory,
                                                               proxy_factory, tmp_path):
    echo = backend_factory("echo")
    faults = tmp_path / "faults"
    config = _config(tmp_path / "proxy.toml", echo.address)
    proxy = proxy_factory("start", "--config", str(config), env=_fault_env(faults))
    old = _booted_workers(proxy, 2, lambda: proxy.log)
    (faults / "worker.boot.always").touch()
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, still serving generation 1 with the old config" in
             proxy.log, message="the reload to fail")
    assert "could not boot" in proxy.log
    assert "stopped accepting" not in proxy.log  # the old generation was never retired
    assert _workers(proxy, 1) == old
    wait_for(lambda: _workers(proxy) == old, message="only the old generation left")
    _round_trip(proxy.port())
    (faults / "worker.boot.always").unlink()
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded: generation 3 serves" in proxy.log, message="the next reload")
    wait_for(lambda: proxy.log.count(" gen 1: stopped accepting") == 2,
             message="generation 1 to retire")
    _round_trip(proxy.port())


def test_respawn_that_cannot_boot_backs_off_and_never_stops_the_proxy(backend_factory,
                                                                       proxy_factory,
                                                                       tmp_path):
    echo = backend_factory("echo")
    faults = tmp_path / "faults"
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "2", env=_fault_env(faults))
    workers = _booted_workers(proxy, 2, lambda: proxy.log)
    stream = Stream(proxy.port())
    stream.turn()
    survivor = _holder(stream.sock, workers)
    [victim] = set(workers) - {survivor}
    (faults / "worker.boot.always").touch()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: proxy.log.count("could not boot (exit code 3)") >= 3,
             message="three failed boots")
    assert "crash loop" in proxy.log  # backing off, not a respawn storm
    assert proxy.process.poll() is None and survivor in _workers(proxy)
    stream.turn()
    _round_trip(proxy.port())
    (faults / "worker.boot.always").unlink()
    _booted_workers(proxy, 2, lambda: proxy.log, timeout=15)
    stream.turn()
    stream.close()


# --------------------------------------------------------------------------- A: master death


def test_orphaned_workers_hold_off_new_handshakes_and_serve_the_queued(backend_factory,
                                                                      proxy_factory,
                                                                      tmp_path):
    echo = backend_factory("echo")
    config = _config(tmp_path / "proxy.toml", echo.address, workers=1,
                     server="drain_timeout_s = 3")
    proxy = proxy_factory("start", "--config", str(config))
    [worker] = _booted_workers(proxy, 1, lambda: proxy.log)
    stream = Stream(proxy.port())  # keeps the worker draining
    stream.turn()
    os.kill(worker, signal.SIGSTOP)  # clients queue in the kernel meanwhile
    try:
        queued = [socket.create_connection(("127.0.0.1", proxy.port()), timeout=5)
                  for _ in range(8)]
        for sock in queued:
            sock.sendall(b"queued")
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.process.wait(5)
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: "is gone; draining (new handshakes held off on 1 of 1" in proxy.log, 3,
             message="the worker to notice")
    for sock in queued:  # what was queued before the death is served
        assert recv_exactly(sock, 6) == transform(b"queued")
        sock.close()
    # A new client does not get a handshake (it would be queued, then reset at exit).
    late = socket.socket()
    late.settimeout(0.5)
    try:
        code = late.connect_ex(("127.0.0.1", proxy.port()))
    finally:
        late.close()
    assert code != 0, "a client connected after the master's death was queued"
    stream.turn()  # the open stream still flows during the drain
    stream.close()
    wait_for(lambda: not alive(worker), 10, message="the worker to exit")
