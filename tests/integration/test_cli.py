"""The command line: check, start, errors and exit codes, python -m, and the Python API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from support import ProxyProcess, alive, free_port, recv_exactly, transform, write_config


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_check_accepts_a_good_file(tmp_path):
    config = write_config(tmp_path / "proxy.toml", textwrap.dedent("""
        [server]
        workers = 2
        [[tcp_proxy]]
        bind = "127.0.0.1:1"
        backends = ["127.0.0.1:2", "127.0.0.1:3"]
    """))
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert "OK: 1 listener(s), workers=2" in result.stdout
    assert "127.0.0.1:1 -> 127.0.0.1:2, 127.0.0.1:3" in result.stdout


def test_check_does_not_bind(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:  # the port is taken...
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "proxy.toml",
                              f'[[tcp_proxy]]\nbind = "127.0.0.1:{port}"\nbackends = ["a:1"]\n')
        assert run_cli("check", "--config", str(config)).returncode == 0  # ...and check is fine


@pytest.mark.parametrize("command", ["check", "start"])
def test_invalid_config_exits_2_naming_file_line_section_key(command, tmp_path):
    config = write_config(tmp_path / "bad.toml", textwrap.dedent("""\
        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = ["127.0.0.1:2"]

        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = []
    """))
    result = run_cli(command, "--config", str(config))
    assert result.returncode == 2
    assert (f'{config}:7: tcp_proxy[2] (bind "127.0.0.1:0"): key "backends": expected a '
            "non-empty list") in result.stderr
    assert "ready" not in result.stderr  # nothing was bound or forked


def test_start_without_bind_or_config_is_a_usage_error():
    result = run_cli("start", "--backend", "127.0.0.1:1")
    assert result.returncode == 2
    assert "expected --config FILE, or --bind HOST:PORT" in result.stderr


def test_bind_failure_exits_1_with_a_clear_message():
    with socket.create_server(("127.0.0.1", 0)) as busy:  # no SO_REUSEPORT: a real conflict
        port = busy.getsockname()[1]
        result = run_cli("start", "--bind", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                         "--workers", "1")
    assert result.returncode == 1
    assert f"cannot bind 127.0.0.1:{port}: address already in use" in result.stderr


def test_workers_default_to_cpu_count(backend_factory, proxy_factory):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address)
    assert f"workers={os.cpu_count()}" in proxy.log
    proxy.wait_workers(os.cpu_count())


def test_threads_auto_is_one_relay_thread_per_worker_under_a_gil(backend_factory,
                                                                proxy_factory):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "1", "--threads", "auto")
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    expected = 1 if gil else len(os.sched_getaffinity(0))
    assert f"workers=1 threads={expected} " in proxy.log
    result = run_cli("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                     "--threads", "many")
    assert result.returncode == 2
    assert 'argument --threads: expected "auto" or a number' in result.stderr


def test_sigterm_stops_master_and_workers_with_exit_0(backend_factory, proxy_factory):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "2")
    workers = proxy.wait_workers(2)
    with proxy.connect() as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == transform(b"abc")
    assert proxy.stop() == 0
    assert not any(alive(pid) for pid in workers)


def test_sigint_fast_stop_exit_0(backend_factory, proxy_factory):
    backend = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", backend.address,
                          "--workers", "2")
    proxy.wait_workers(2)
    proxy.signal(signal.SIGINT)
    assert proxy.process.wait(10) == 0


def test_config_file_with_cli_worker_override(backend_factory, proxy_factory, tmp_path):
    backend = backend_factory("echo")
    config = write_config(tmp_path / "proxy.toml", textwrap.dedent(f"""
        [server]
        workers = 3
        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = ["{backend.address}"]
    """))
    proxy = proxy_factory("start", "--config", str(config), "--workers", "1")
    proxy.wait_workers(1)
    with proxy.connect() as sock:
        sock.sendall(b"over")
        assert recv_exactly(sock, 4) == transform(b"over")


def test_python_api_serves(backend_factory, tmp_path):
    backend = backend_factory("echo")
    port = free_port()  # the API binds a fixed address: find a free one
    script = textwrap.dedent(f"""
        import sys
        from prefork_proxy import TcpProxy
        from prefork_proxy.cli import configure_logging
        configure_logging("info")
        sys.exit(TcpProxy(["{backend.address}"], connect_timeout_ms=3000)
                 .bind("127.0.0.1:{port}", workers=2))
    """)
    proxy = ProxyProcess([], tmp_path / "api.log", command=[sys.executable, "-c", script])
    try:
        assert proxy.port() == port
        with proxy.connect() as sock:
            sock.sendall(b"api")
            assert recv_exactly(sock, 3) == transform(b"api")
    finally:
        assert proxy.stop() == 0
