"""The pidfile lock, the status-file warning, the after-fork hygiene and ListenerSet keys,
driven directly in this process (forked children where a second process is the point)."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest
from support import free_port

from prefork_proxy import config, control, hygiene
from prefork_proxy.errors import BindError, ProxyError
from prefork_proxy.listeners import ListenerSet
from prefork_proxy.master import Master
from prefork_proxy.rows import WorkerRows


def test_a_locked_pidfile_refuses_a_second_holder_and_is_released_on_remove(tmp_path):
    path = str(tmp_path / "proxy.pid")
    first = control.PidFile(path)
    first.acquire(os.getpid())
    # (Not control.is_locked here: closing any descriptor of the file in the
    # holding process would release its lock, which is why the master never does.)
    pid = os.fork()
    if pid == 0:  # another process: sees the lock, cannot take it
        code = 0
        try:
            assert control.is_locked(path)
            try:
                control.PidFile(path).acquire(os.getpid())
                code = 1
            except ProxyError as exc:
                code = 0 if f"(pid {os.getppid()}) is running" in str(exc) else 2
        except BaseException:
            code = 3
        os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert open(path).read() == f"{os.getpid()}\n"
    first.remove()
    assert not os.path.exists(path)
    second = control.PidFile(path)
    second.acquire(os.getpid())  # free again
    second.remove()


def test_status_write_failures_warn_once_per_cause(tmp_path, caplog):
    master = Master(config.load_text('[[tcp_proxy]]\nbind = "127.0.0.1:0"\n'
                                     'backends = ["127.0.0.1:9"]\n'))
    master.board = WorkerRows(4, 8)
    master.pidfile = control.PidFile(str(tmp_path / "gone" / "proxy.pid"))
    with caplog.at_level(logging.DEBUG, logger="prefork_proxy.master"):
        for _ in range(3):
            master.write_status(time.monotonic())
    warnings = [r for r in caplog.records if "cannot write the status file" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    (tmp_path / "gone").mkdir()
    with caplog.at_level(logging.DEBUG, logger="prefork_proxy.master"):
        master.write_status(time.monotonic())
    assert (tmp_path / "gone" / "proxy.pid.status.json").exists()
    assert "written again" in caplog.text


def test_after_fork_closes_foreign_listeners_and_master_only_fds():
    own, foreign = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    connected_r, connected_w = socket.socketpair()
    read_fd, write_fd = os.pipe()
    hygiene.master_only(write_fd)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            closed = hygiene.after_fork(keep={own.fileno()}, close=[read_fd])

            def is_open(fd: int) -> bool:
                try:
                    os.fstat(fd)
                    return True
                except OSError:
                    return False

            if closed == 1 and is_open(own.fileno()) and not is_open(foreign.fileno()) \
                    and is_open(connected_r.fileno()) and not is_open(read_fd) \
                    and not is_open(write_fd):
                code = 0
        finally:
            os._exit(code)
    try:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        hygiene.forget(write_fd)
        for closable in (own, foreign, connected_r, connected_w):
            closable.close()
        os.close(read_fd)
        os.close(write_fd)


def _listeners(*binds: str):
    text = "".join(f'[[tcp_proxy]]\nbind = "{b}"\nbackends = ["127.0.0.1:9"]\n' for b in binds)
    return config.load_text(text).listeners


def test_one_address_spelled_two_ways_is_one_listener():
    port = free_port()
    listeners = ListenerSet()
    try:
        [first] = listeners.open(_listeners(f"127.0.0.1:{port}"))
        [again] = listeners.open(_listeners(f"localhost:{port}"))
        assert again is first
        with pytest.raises(BindError, match="binds the same address"):
            listeners.open(_listeners(f"127.0.0.1:{port}", f"localhost:{port}"))
    finally:
        listeners.close()


def test_a_retired_listener_added_back_is_the_same_socket_accepting_again():
    listeners = ListenerSet()
    port = free_port()
    try:
        [sock] = listeners.open(_listeners(f"127.0.0.1:{port}"))
        other = listeners.open(_listeners("127.0.0.1:0"))
        assert listeners.retain(other) == [sock] and listeners.has_retired()
        [back] = listeners.open(_listeners(f"127.0.0.1:{port}"))
        assert back is sock and not listeners.has_retired()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the drop filter is gone: the handshake completes
    finally:
        listeners.close()
