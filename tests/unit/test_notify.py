"""notify.py: the exact datagrams systemd would receive, and silence without systemd.

A real ``AF_UNIX`` ``SOCK_DGRAM`` socket bound in tmp_path (or in the abstract
namespace) stands in for systemd's notification socket.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from prefork_proxy import notify


def _receive(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)  # a bound: the datagram is already queued when notify returns
    return sock.recv(65536)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path in tmp_path, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_ready_sends_exactly_ready(systemd):
    assert notify.ready() is True
    assert _receive(systemd) == b"READY=1"


def test_ready_with_status_is_one_datagram(systemd):
    assert notify.ready("serving 127.0.0.1:5432 with 4 workers")
    assert _receive(systemd) == b"READY=1\nSTATUS=serving 127.0.0.1:5432 with 4 workers"


def test_stopping_and_status(systemd):
    assert notify.stopping()
    assert notify.status("draining 3 connections")
    assert _receive(systemd) == b"STOPPING=1"
    assert _receive(systemd) == b"STATUS=draining 3 connections"


def test_status_newlines_cannot_inject_assignments(systemd):
    assert notify.status("line one\nREADY=1")
    assert _receive(systemd) == b"STATUS=line one READY=1"


def test_reloading_carries_clock_monotonic_microseconds(systemd):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", _receive(systemd))
    assert match, "expected exactly RELOADING=1 and MONOTONIC_USEC in one datagram"
    assert before <= int(match.group(1)) <= after


def test_raw_notify_sends_the_message_unchanged(systemd):
    assert notify.notify("READY=1\nSTATUS=x")
    assert _receive(systemd) == b"READY=1\nSTATUS=x"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux's")
def test_abstract_namespace_socket(monkeypatch):
    name = f"prefork-proxy-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # what systemd means by "@name"
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert _receive(sock) == b"READY=1"


def test_unset_variable_returns_false_and_sends_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready() is False
    assert notify.reloading() is False
    assert notify.stopping() is False
    assert notify.status("x") is False


def test_empty_or_unsupported_address_returns_false(monkeypatch):
    for value in ("", "vsock:2:1234", "relative/notify.sock"):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert notify.ready() is False


def test_nothing_bound_at_the_path_returns_false_without_raising(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-here.sock"))
    with caplog.at_level(logging.DEBUG, logger="prefork_proxy.notify"):
        assert notify.ready() is False
    assert "cannot notify" in caplog.text


def test_stale_socket_file_returns_false(tmp_path, monkeypatch):
    """The file exists but its socket was closed (systemd gone): ECONNREFUSED, not an error."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert path.exists()
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert notify.stopping() is False


def test_stream_socket_at_the_path_returns_false(tmp_path, monkeypatch):
    """A socket of the wrong type (EPROTOTYPE) is a broken socket, not an exception."""
    path = tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.ready() is False
