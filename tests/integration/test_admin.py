"""The admin endpoint of the real proxy: /live, /ready, /status, /metrics over loopback HTTP.

Every test runs the real CLI with ``[admin] bind`` on port 0 (the bound port
is read from the master's log line) in front of real backends, and talks
plain HTTP to it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Dict, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    ProxyProcess,
    alive,
    children_of,
    process_title,
    recv_exactly,
    transform,
    wait_for,
    write_config,
)

from prefork_proxy import __version__
from prefork_proxy import status as status_model

ADMIN_LINE = re.compile(r"admin endpoint listening on (\S+):(\d+)")


def _config(path, backends, *, workers=2, server="", admin='bind = "127.0.0.1:0"'):
    backend_list = ", ".join(f'"{b}"' for b in backends)
    return write_config(path, textwrap.dedent(f"""
        [server]
        workers = {workers}
        {server}

        [admin]
        {admin}

        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = [{backend_list}]
    """))


def admin_port(proxy: ProxyProcess) -> int:
    return int(wait_for(lambda: ADMIN_LINE.search(proxy.log), message="the admin line").group(2))


def get(port: int, path: str, timeout: float = 5.0) -> Tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def admin_pid(proxy: ProxyProcess) -> Optional[int]:
    for pid in children_of(proxy.pid):
        try:
            if process_title(pid) == "prefork-proxy: admin":
                return pid
        except FileNotFoundError:
            continue
    return None


def listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def holders(inode: str, pids: List[int]) -> List[int]:
    """Which of ``pids`` hold a descriptor of socket ``inode``."""
    target = f"socket:[{inode}]"
    found = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(pid)
                    break
            except FileNotFoundError:
                continue
    return found


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_proxy", *args], capture_output=True,
                          text=True, timeout=30)


def without_age(model: Dict) -> Dict:
    return {k: v for k, v in model.items() if k != "stale_s"}


def test_endpoints_while_serving_and_status_is_the_cli_model(backend_factory, proxy_factory,
                                                              tmp_path):
    echo = backend_factory("echo")
    pidfile = tmp_path / "proxy.pid"
    config = _config(tmp_path / "proxy.toml", [echo.address], server=f'pidfile = "{pidfile}"')
    proxy = proxy_factory("start", "--config", str(config))
    workers = proxy.wait_workers(2)
    port = admin_port(proxy)
    with proxy.connect() as client:  # the proxy relays while the admin port answers
        client.sendall(b"hello")
        assert recv_exactly(client, 5) == transform(b"hello")

    assert get(port, "/live")[:2] == (200, "text/plain; charset=utf-8")
    assert wait_for(lambda: get(port, "/ready")[0] == 200, message="/ready 200")
    assert get(port, "/nope")[0] == 404

    # /status, the status file and `prefork-proxy status` show one model: compare
    # them on one snapshot (the master republishes about once a second).
    def same_snapshot() -> Optional[Tuple[Dict, Dict, str]]:
        code, content_type, body = get(port, "/status")
        if code == 503:
            return None  # nothing published yet
        assert (code, content_type) == (200, "application/json")
        served = json.loads(body)
        shown = cli("status", "--pidfile", str(pidfile))
        on_disk = json.loads((tmp_path / "proxy.pid.status.json").read_text())
        after = json.loads(get(port, "/status")[2])
        # Both workers serving: the first model is published at once after
        # ``ready``, when the last-forked worker may not have flagged its boot yet.
        if not (served["written_at"] == on_disk["written_at"] == after["written_at"]
                and len(served["workers"]) == 2 and shown.returncode == 0
                and all(w["state"] == "serving" for w in served["workers"])):
            return None
        return served, on_disk, shown.stdout

    served, on_disk, shown = wait_for(same_snapshot, 15, interval=0.05,
                                      message="one status snapshot seen by all three")
    assert without_age(served) == on_disk
    assert shown.rstrip("\n") == status_model.render_text(served)
    assert served["pid"] == proxy.pid and served["generation"] == 1
    assert sorted(w["pid"] for w in served["workers"]) == workers
    assert [b["backend"] for b in served["backends"]] == [echo.address]
    assert served["backends"][0]["state"] == "up" and served["stopping"] is False

    code, content_type, body = get(port, "/metrics")
    assert code == 200 and content_type.startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("prefork_proxy_build_info", (("version", __version__),))] == 1
    assert samples[("prefork_proxy_config_generation", ())] == 1
    assert samples[("prefork_proxy_workers", (("state", "serving"),))] == 2
    assert samples[("prefork_proxy_workers", (("state", "draining"),))] == 0
    # The process collector reads the master (not the admin process).
    with open(f"/proc/{proxy.pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    assert "process_cpu_seconds" in families and "process_resident_memory_bytes" in families
    boot_time = next(float(line.split()[1]) for line in open("/proc/stat")
                     if line.startswith("btime"))
    assert samples[("process_start_time_seconds", ())] == pytest.approx(
        boot_time + start_ticks / os.sysconf("SC_CLK_TCK"), abs=0.02)

    # The admin socket is the master's and the admin process's, never a worker's.
    admin = admin_pid(proxy)
    assert admin is not None
    inode = listening_inode(port)
    assert holders(inode, [proxy.pid, admin, *workers]) == [proxy.pid, admin]
    # And the admin process holds no proxy listener (hygiene.after_fork).
    assert holders(listening_inode(proxy.port()), [proxy.pid, admin]) == [proxy.pid]


def test_ready_turns_503_at_sigterm_while_a_connection_drains(backend_factory, proxy_factory,
                                                              tmp_path):
    echo = backend_factory("echo")
    proxy = proxy_factory("start", "--config", str(_config(tmp_path / "proxy.toml",
                                                           [echo.address])))
    proxy.wait_workers(2)
    port = admin_port(proxy)
    wait_for(lambda: get(port, "/ready")[0] == 200, message="/ready 200")
    client = proxy.connect()
    client.sendall(b"before")
    assert recv_exactly(client, 6) == transform(b"before")

    proxy.signal(signal.SIGTERM)
    code, _, body = wait_for(lambda: (lambda r: r[0] == 503 and r)(get(port, "/ready")),
                             message="/ready 503 after SIGTERM")
    assert body == b"stopping\n"
    # Draining: the open connection still relays, the master loop still turns.
    client.sendall(b"during")
    assert recv_exactly(client, 6) == transform(b"during")
    assert get(port, "/live")[0] == 200
    model = wait_for(lambda: (lambda m: m["stopping"] and m)(json.loads(get(port, "/status")[2])),
                     message="/status to say stopping")
    assert {w["state"] for w in model["workers"]} == {"draining"}
    assert alive(proxy.pid)
    client.close()

    # /live answers 200 (never 503) until the master exits.
    seen = set()
    while proxy.process.poll() is None:
        try:
            seen.add(get(port, "/live", timeout=0.5)[0])
        except OSError:
            pass  # the admin process stopped, or the port closed with the master
    assert proxy.process.wait(10) == 0
    assert seen <= {200} and 200 in seen
    with pytest.raises(OSError):
        get(port, "/live", timeout=1)


def test_a_killed_admin_process_is_restarted_and_nothing_queued_is_lost(
        backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    # No pidfile at all: /status comes from shared memory.
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "1", "--admin", "127.0.0.1:0")
    proxy.wait_workers(1)
    port = admin_port(proxy)
    first = wait_for(lambda: admin_pid(proxy), message="the admin process")
    assert wait_for(lambda: get(port, "/status")[0] == 200, message="/status without pidfile")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), message="the admin process to die")
    # Sent while no admin process runs: it waits in the master's backlog.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as early:
        early.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = early.recv(4096)
            assert chunk, f"closed after {reply!r}"
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    second = admin_pid(proxy)
    assert second not in (None, first)
    assert get(port, "/ready")[0] == 200
    assert "admin process %d died; restarting it" % first in proxy.log
    assert proxy.stop() == 0
    assert not alive(second)


def test_bad_admin_config_and_busy_port(backend_factory, proxy_factory, tmp_path):
    config = _config(tmp_path / "proxy.toml", ["127.0.0.1:9"], admin='bind = "127.0.0.1"')
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert re.search(r'proxy.toml:\d+: admin: key "bind": expected "host:port"', result.stderr)
    result = cli("start", "--bind", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--admin", "x:y")
    assert result.returncode == 2 and 'command line: admin: key "bind"' in result.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                              "--admin", f"127.0.0.1:{taken}", wait_ready=False)
        assert proxy.process.wait(15) == 1
    assert f"cannot bind the admin endpoint 127.0.0.1:{taken}: address already in use" \
        in proxy.log


def test_a_non_loopback_bind_is_warned_once(backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "1", "--admin", "0.0.0.0:0")
    proxy.wait_workers(1)
    port = admin_port(proxy)
    assert get(port, "/live")[0] == 200
    first = wait_for(lambda: admin_pid(proxy), message="the admin process")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: (admin_pid(proxy) or first) != first, message="a new admin process")
    assert get(port, "/live")[0] == 200
    assert proxy.log.count("which is not a loopback address") == 1


def test_hostile_admin_clients_do_not_delay_a_scrape_or_the_relay(backend_factory,
                                                                  proxy_factory, tmp_path):
    """100 slowloris connections (a byte a second) and a 1 MiB head against the real proxy."""
    echo = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "1", "--admin", "127.0.0.1:0")
    proxy.wait_workers(1)
    port = admin_port(proxy)
    wait_for(lambda: get(port, "/status")[0] == 200, message="a published status")
    slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    big = socket.create_connection(("127.0.0.1", port), timeout=5)
    big.setblocking(False)
    head = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20)
    sent_big = 0
    scrapes = []
    client = proxy.connect()
    try:
        for second in range(3):
            for sock in slow:
                try:
                    sock.send(b"G")
                except OSError:
                    pass  # evicted or timed out: the server's choice
            try:
                sent_big += big.send(head[sent_big:])
            except (BlockingIOError, OSError):
                pass
            for _ in range(4):
                started = time.monotonic()
                code, _, body = get(port, "/metrics")
                scrapes.append(time.monotonic() - started)
                assert code == 200 and b"prefork_proxy_workers" in body
            payload = f"round {second}".encode()
            client.sendall(payload)
            assert recv_exactly(client, len(payload)) == transform(payload)
            time.sleep(1.0)  # the attackers' pace: one byte per second each
    finally:
        client.close()
        big.close()
        for sock in slow:
            sock.close()
    print(f"scrapes under attack: n={len(scrapes)} max={max(scrapes) * 1000:.1f} ms "
          f"median={sorted(scrapes)[len(scrapes) // 2] * 1000:.1f} ms")
    assert max(scrapes) < 0.1, scrapes


def test_status_and_metrics_show_the_reload_results(backend_factory, proxy_factory, tmp_path):
    echo = backend_factory("echo")
    path = tmp_path / "proxy.toml"
    _config(path, [echo.address], workers=1)
    proxy = proxy_factory("start", "--config", str(path))
    proxy.wait_workers(1)
    port = admin_port(proxy)

    def model():
        code, _, body = get(port, "/status")
        return json.loads(body) if code == 200 else None

    def generation_metric() -> float:
        body = get(port, "/metrics")[2].decode()
        return next(s.value for f in text_string_to_metric_families(body) for s in f.samples
                    if s.name == "prefork_proxy_config_generation")

    assert wait_for(model, message="a published status")["last_reload"] is None
    good = path.read_text()
    path.write_text(good.replace("workers = 1", "workers = 0"))  # invalid
    proxy.signal(signal.SIGHUP)
    failed = wait_for(lambda: (lambda m: m and m["last_reload"] and m)(model()),
                      message="/status to show the failed reload")
    assert failed["last_reload"]["ok"] is False and failed["generation"] == 1
    assert 'key "workers"' in failed["last_reload"]["error"]
    assert "last reload: FAILED" in status_model.render_text(failed)
    assert generation_metric() == 1

    path.write_text(good)
    proxy.signal(signal.SIGHUP)
    ok = wait_for(lambda: (lambda m: m and m["last_reload"]["ok"] and m)(model()),
                  message="/status to show the reload that worked")
    assert ok["generation"] == ok["last_reload"]["generation"] == 2
    assert generation_metric() == 2


def test_live_turns_503_while_the_master_loop_is_stuck(backend_factory, proxy_factory):
    echo = backend_factory("echo")
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", echo.address,
                          "--workers", "1", "--admin", "127.0.0.1:0")
    proxy.wait_workers(1)
    port = admin_port(proxy)
    assert wait_for(lambda: get(port, "/live")[0] == 200, message="/live 200")
    os.kill(proxy.pid, signal.SIGSTOP)  # the master loop stops turning; its children run
    try:
        stuck_at = time.monotonic()
        code, _, body = wait_for(lambda: (lambda r: r[0] == 503 and r)(get(port, "/live")),
                                 timeout=15, message="/live 503 for a stuck master")
        assert time.monotonic() - stuck_at >= 4.0  # not before the 5 s threshold (-1 s turn)
        assert body.startswith(b"master loop silent for ")
        assert get(port, "/ready")[0] == 200  # the workers still serve
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    assert wait_for(lambda: get(port, "/live")[0] == 200, message="/live 200 again")
