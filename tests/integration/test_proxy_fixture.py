"""The proxy-under-test fixture itself (tests/conftest.py ``proxy_factory``, pytest-xprocess).

A small test session is run in a subprocess (pytester) with this suite's
conftest: its failing test must report the proxy's whole log, a proxy that
exits before ``ready`` must fail its test at once with the log (not after the
15 s ready timeout), every proxy must be stopped at teardown, and a stopped
proxy must leave no file descriptor open in the test process.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from support import alive

TESTS = Path(__file__).resolve().parents[1]

INNER = '''
from support import ProxyProcess


def test_fails_after_the_proxy_started(proxy_factory):
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                          "--workers", "1")
    proxy.wait_workers(1)
    print("pids", proxy.pid, *proxy.worker_pids())
    raise AssertionError("deliberate")


def test_a_proxy_that_exits_before_ready(proxy_factory):
    proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", "nonsense")


def test_a_stopped_proxy_leaves_no_file_descriptor_behind(proxy_factory):
    import os
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", "127.0.0.1:9").stop()
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_preexec_fn_gets_a_plain_proxy_process(proxy_factory):
    proxy = proxy_factory("start", "--bind", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                          preexec_fn=lambda: None)
    assert type(proxy) is ProxyProcess
    assert proxy.connect()
'''


def test_the_proxy_fixture_reports_logs_fails_fast_and_stops_its_proxies(pytester,
                                                                          monkeypatch):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # support.py, as pytest's pythonpath does
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # the inner session is not one
    started = time.monotonic()
    result = pytester.runpytest_subprocess(timeout=90)
    elapsed = time.monotonic() - started
    output = result.stdout.str()
    result.assert_outcomes(failed=2, passed=2)
    # Started by xprocess, which waited for the ready line.
    assert "process 'prefork-proxy-0' started" in output
    # The failing test's report has the proxy's whole log: from its first line
    # through ready to what it logged after (the worker booting).
    assert "prefork-proxy log " in output
    section = output.split("prefork-proxy log ", 1)[1]
    assert "open-file limit" in section
    assert re.search(r"ready pid=\d+ listeners=127\.0\.0\.1:\d+", section)
    assert "worker 0 booted" in section
    # A proxy that dies before ready fails its test with its exit code and log,
    # at once rather than at the ready timeout (15 s).
    assert "AssertionError: proxy exited with 2:" in output
    assert "expected \"host:port\", got 'nonsense'" in output
    assert elapsed < 15, elapsed
    # Every proxy (master and workers) was stopped at teardown.
    pids = [int(p) for p in re.search(r"pids ((?:\d+ ?)+)", output).group(1).split()]
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)
