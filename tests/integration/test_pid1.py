"""The master as PID 1 of a real PID namespace, as in a container (``unshare --pid``).

As PID 1 the master is the namespace's child reaper: every orphan in the
namespace is re-parented to it and stays a zombie until it waits for it.  And
the kernel treats PID 1 apart: a signal it has no handler for is dropped (so
SIGTERM works only because the master handles it), and when PID 1 exits the
kernel SIGKILLs everything else in the namespace (so the master must not exit
before its workers have drained).

The proxy starts through ``deploy/docker-entrypoint.sh``, which execs the
master, inside ``unshare --pid --fork --mount-proc`` (root only).  These tests
look at the namespace from outside, through the host's /proc: each process
there has a host pid, and ``NSpid`` in /proc/PID/status gives its pid inside.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
from support import (
    ProxyProcess,
    children_of,
    process_state,
    process_title,
    recv_exactly,
    status_field,
    transform,
    wait_for,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
UNSHARE = shutil.which("unshare")
NSENTER = shutil.which("nsenter")
DRAIN_TIMEOUT_S = 20


def unshare_unavailable() -> Optional[str]:
    """Why a PID namespace cannot be made here, or None."""
    if UNSHARE is None or NSENTER is None:
        return "util-linux unshare/nsenter are not installed"
    if os.geteuid() != 0:
        return "unshare --pid --mount-proc needs root"
    probe = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {probe.stderr.strip()}"
    return None


def pid_namespace(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:  # gone, or not ours to look at (this sandbox's own PID 1, say)
        return None


def namespace_processes(namespace: str) -> Dict[int, str]:
    """``{host pid: state}`` of every process in ``namespace``, zombies included."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == namespace:
            state = process_state(int(entry))
            if state is not None:
                found[int(entry)] = state
    return found


def inner_pid(pid: int) -> int:
    """The pid of host process ``pid`` inside its own (innermost) PID namespace."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid: line in /proc/{pid}/status")


def find_process(namespace: str, title: str) -> int:
    """The host pid of the one process in ``namespace`` whose command line is ``title``."""
    def found() -> Optional[int]:
        pids = [pid for pid in namespace_processes(namespace) if process_title(pid) == title]
        assert len(pids) <= 1, pids
        return pids[0] if pids else None

    return wait_for(found, message=f"{title!r} in the namespace")


class Pid1Proxy:
    """The entrypoint as PID 1 of a new PID namespace, seen from the host."""

    def __init__(self, tmp_path: Path, backend_address: str) -> None:
        config = write_config(tmp_path / "proxy.toml", textwrap.dedent(f"""
            [server]
            workers = 2
            drain_timeout_s = {DRAIN_TIMEOUT_S}
            [[tcp_proxy]]
            bind = "127.0.0.1:0"
            backends = ["{backend_address}"]
        """))
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("PREFORK_PROXY_") and key != "NOTIFY_SOCKET"}
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                       env.get("PATH", "/usr/bin:/bin")])
        env["PREFORK_PROXY_CONFIG"] = str(config)
        # PID 1 of the namespace is first this shell: it leaves an orphan (the subshell
        # exits, so its `sleep` is re-parented to PID 1), then execs the entrypoint,
        # which execs the master.  The master thus starts with a child it never forked.
        # --kill-child: if the test dies, SIGKILL to PID 1 takes the namespace down.
        command = [UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                   "sh", "-c", '(sleep 601 &); exec "$0"', str(ENTRYPOINT)]
        self.proxy = ProxyProcess((), tmp_path / "pid1.log", command=command, env=env)
        # unshare forks PID 1 of the namespace and waits for it.
        self.master = wait_for(lambda: children_of(self.proxy.pid),
                               message="unshare's child")[0]
        namespace = pid_namespace(self.master)
        assert namespace is not None and namespace != pid_namespace(os.getpid())
        self.namespace = namespace

    def workers(self, count: int) -> List[int]:
        """Host pids of the master's ``count`` workers, once each has booted."""
        def booted() -> Optional[List[int]]:
            pids = [pid for pid in children_of(self.master)
                    if process_title(pid).startswith("prefork-proxy: worker")]
            if len(pids) == count and self.proxy.log.count(" booted: pid=") >= count:
                return pids
            return None

        return wait_for(booted, message=f"{count} booted workers")

    def no_zombie_remains(self) -> None:
        """Every zombie in the namespace now is reaped soon.

        A child that just exited is a zombie until the master's SIGCHLD handling
        waits for it (a draining worker with nothing to drain, say): only one
        that stays a zombie is a fault.
        """
        zombies = [pid for pid, state in namespace_processes(self.namespace).items()
                   if state == "Z"]
        wait_for(lambda: all(process_state(pid) is None for pid in zombies),
                 message=f"the master to reap the zombies {zombies}")

    def close(self) -> None:
        if process_state(self.master) is not None:
            os.kill(self.master, signal.SIGKILL)  # PID 1's death kills the whole namespace
        self.proxy.stop()


@pytest.fixture
def pid1_proxy(tmp_path, backend_factory) -> Iterator[Pid1Proxy]:
    reason = unshare_unavailable()
    if reason:
        pytest.skip(reason)
    backend = backend_factory("echo")
    running = Pid1Proxy(tmp_path, backend.address)
    yield running
    running.close()


def reaped_after_kill(running: Pid1Proxy, orphan: int) -> None:
    """``orphan`` was adopted by the master; once killed, the master must reap it."""
    assert status_field(orphan, "PPid") == running.master
    os.kill(orphan, signal.SIGKILL)
    # A dead process stays in /proc as a zombie until its parent waits for it.
    wait_for(lambda: process_state(orphan) is None,
             message=f"the master (PID 1) to reap orphan {orphan}")


def test_master_as_pid_1_reaps_orphans_and_drains_on_sigterm(pid1_proxy):
    running = pid1_proxy
    assert inner_pid(running.master) == 1
    assert re.search(r"ready pid=1 listeners=", running.proxy.log), running.proxy.log
    workers = running.workers(2)

    # The orphan the master inherited at exec.
    reaped_after_kill(running, find_process(running.namespace, "sleep 601"))
    # One orphaned while it serves, as after `docker exec` of something that forks a
    # child and exits: nsenter's shell is a child of nsenter (outside the namespace),
    # its subshell forks `sleep` and exits, so the kernel re-parents `sleep` to PID 1.
    subprocess.run([NSENTER, "--target", str(running.master), "--pid", "--mount", "--",
                    "sh", "-c", "(sleep 602 &)"], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10, check=True)
    reaped_after_kill(running, find_process(running.namespace, "sleep 602"))
    running.no_zombie_remains()

    first, second = os.urandom(256 * 1024), os.urandom(256 * 1024)
    with running.proxy.connect() as sock:
        sock.sendall(first)
        assert recv_exactly(sock, len(first)) == transform(first)
        # A signal from outside the namespace reaches PID 1 only through a handler.
        os.kill(running.master, signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_for(lambda: "SIGTERM: graceful stop" in running.proxy.log,
                 message="the master to start draining")
        # Draining: the open connection is still served, byte for byte.  Had PID 1
        # exited now, the kernel would have SIGKILLed its workers with it.
        sock.sendall(second)
        assert recv_exactly(sock, len(second)) == transform(second)
        running.no_zombie_remains()
    # The connection's end ends the drain: the master exits 0 (unshare passes the code
    # on), well before drain_timeout_s.
    assert running.proxy.process.wait(DRAIN_TIMEOUT_S + 10) == 0
    assert time.monotonic() - stopped_at < DRAIN_TIMEOUT_S
    log = running.proxy.log
    assert "master 1 exiting with code 0" in log, log
    # Both workers ended by themselves (drained), not by the kernel's SIGKILL at PID 1's
    # exit: the master waited for each, and nothing of the namespace is left, zombie or not.
    assert len(re.findall(r"worker \d gen 1 \(pid \d+\) exited with exit code 0", log)) == 2, log
    assert [pid for pid in workers if process_state(pid) is not None] == []
    assert namespace_processes(running.namespace) == {}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT])
def test_master_as_pid_1_fast_stop_closes_connections_and_exits_0(pid1_proxy, signum):
    """SIGINT (Ctrl-C, ``docker stop`` with STOPSIGNAL SIGINT) and SIGQUIT: the fast stop."""
    running = pid1_proxy
    workers = running.workers(2)
    with running.proxy.connect() as sock:
        sock.sendall(b"x" * 1024)
        assert recv_exactly(sock, 1024) == transform(b"x" * 1024)
        os.kill(running.master, signum)
        # Closed now, not at the drain deadline: EOF or a reset, within the bound.
        sock.settimeout(DRAIN_TIMEOUT_S / 2)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    assert running.proxy.process.wait(DRAIN_TIMEOUT_S / 2) == 0
    assert f"{signal.Signals(signum).name}: fast stop" in running.proxy.log
    assert "master 1 exiting with code 0" in running.proxy.log
    assert [pid for pid in workers if process_state(pid) is not None] == []
    assert namespace_processes(running.namespace) == {}
