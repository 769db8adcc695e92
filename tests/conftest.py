"""Fixtures shared by every test.  Helpers live in support.py (on sys.path via pytest config).

``proxy_factory`` is the proxy under test: it starts the real ``prefork-proxy``
CLI through pytest-xprocess (``XProxy``), which waits for the ``ready pid=``
line; a failing test's report gets a section with each of its proxies' whole
log (``pytest_runtest_makereport`` below: xprocess's own hook means to do that
but finds no report under pluggy >= 1.0); at teardown the fixture stops each
proxy (SIGTERM, then SIGKILL after 15 s) and copies its log to the test's
tmp_path.  Tests that need a ``preexec_fn`` (rlimits in the
child) get a plain ``support.ProxyProcess`` from the same factory: xprocess
runs its own preexec (``setpgrp``).  Both have the same API.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest
from support import BackendProcess, ProxyProcess
from xprocess import ProcessStarter

# tests/integration/test_proxy_fixture.py runs a small session with this conftest.
pytest_plugins = ["pytester"]

# Tests hold thousands of sockets: raise this process's soft open-file limit to the hard one.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture
def backend_factory() -> Iterator[Callable[..., BackendProcess]]:
    """Start test backends (tests/backends.py); all are killed after the test."""
    started: List[BackendProcess] = []

    def start(mode: str = "echo", name: str = "backend", *extra: str) -> BackendProcess:
        backend = BackendProcess(mode, name, *extra)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


class _ProxyStarter(ProcessStarter):
    """How xprocess starts the proxy and knows it is up; ``args`` etc. are set per proxy."""

    pattern = ProxyProcess.READY.pattern
    timeout = 15  # seconds, as ProxyProcess.wait_ready
    max_read_lines = 1_000_000  # the ready line may follow many startup lines
    terminate_on_interrupt = True  # Ctrl-C does not reach it (own process group): xprocess stops it

    def get_lines(self, log_file):
        """The log's lines as they come; fail at once, with the log, if the proxy exits.

        xprocess's own reader polls every 100 ms and waits out the whole timeout
        for a process that already died; this one polls every 10 ms and stops.
        """
        # The Popen xprocess made just before it called wait() (XProcess.resources[-1]).
        popen: subprocess.Popen = self.process.resources[-1].popen
        while True:
            line = log_file.readline()
            if line:
                yield line
                continue
            if popen.poll() is not None:
                log = Path(log_file.name).read_text(errors="replace")
                raise AssertionError(f"proxy exited with {popen.returncode}:\n{log}")
            if datetime.now() > self._max_time:
                raise TimeoutError(f"timed out after {self.timeout} s waiting for the proxy's "
                                   f"ready line")
            time.sleep(0.01)


class XProxy(ProxyProcess):
    """The real prefork-proxy CLI, started and awaited by pytest-xprocess as ``name``.

    Same API as ProxyProcess (port, connect, signal, worker_pids, process, log, stop);
    the log is xprocess's (``.pytest_cache/d/.xprocess/NAME/xprocess.log``).
    """

    def __init__(self, xprocess, name: str, args, wait_ready: bool = True,
                 env: Optional[dict] = None, cwd: Optional[Path] = None) -> None:
        self.xprocess = xprocess
        self.name = name
        self.info = xprocess.getinfo(name)
        self._wait_ready = wait_ready
        super().__init__(args, Path(str(self.info.logpath)), wait_ready=False, env=env,
                         cwd=cwd)
        if wait_ready:
            self.wait_ready()  # xprocess saw the line: this only reads the listeners

    def _spawn(self, preexec_fn, env, cwd) -> subprocess.Popen:
        assert preexec_fn is None, "xprocess runs its own preexec_fn: use ProxyProcess"
        # A pid file left by an earlier run names a process that may no longer be ours:
        # xprocess would terminate its whole tree on restart.  Never let it.
        if self.info.pidpath.check():
            self.info.pidpath.remove()
        self.info.pid = None
        attributes = {
            "args": self.args, "env": env,
            # xprocess runs it in its control dir; keep the test's working directory.
            "popen_kwargs": {"cwd": str(cwd or os.getcwd())},
        }
        if not self._wait_ready:  # the test waits (or not) itself: up as soon as started
            attributes.update(pattern=None, startup_check=lambda starter: True)
        starter = type("ProxyStarter", (_ProxyStarter,), attributes)
        pid, _ = self.xprocess.ensure(self.name, starter, restart=True, persist_logs=False)
        self._resource = self.xprocess.resources[-1]  # this start's Popen and log handle
        popen = self._resource.popen
        assert popen.pid == pid
        return popen

    def stop(self, timeout: float = 15.0, fast_after: Optional[float] = None) -> int:
        returncode = super().stop(timeout, fast_after)
        if self.info.pidpath.check():  # reaped: its pid may be reused by anyone now
            self.info.pidpath.remove()
        # xprocess keeps each start's log handle open for the whole session (and
        # reads it in every report): one fd per proxy ever started, hundreds in
        # this suite, which tests counting this process's fds see.  Give it back.
        logfiles = getattr(self.xprocess.config, "_extlogfiles", {})
        if logfiles.get(self.name) in self._resource.fhandles:
            del logfiles[self.name]
        if self._resource in self.xprocess.resources:
            self.xprocess.resources.remove(self._resource)
        self._resource.release()
        return returncode


# "gw0-" etc. under pytest-xdist (scripts/test runs the suite in 2 processes), else "".
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_XDIST_WORKER += "-" if _XDIST_WORKER else ""

_PROXIES = pytest.StashKey[List[ProxyProcess]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the log of every proxy the test started to its report when it fails."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for proxy in item.stash.get(_PROXIES, []):
            report.sections.append((f"prefork-proxy log {proxy.log_path}", proxy.log))


@pytest.fixture
def proxy_factory(request, tmp_path, xprocess) -> Iterator[Callable[..., ProxyProcess]]:
    """Start the real prefork-proxy CLI; every instance is stopped after the test.

    ``proxy_factory(*args, wait_ready=True, env=None, preexec_fn=None)``: with a
    ``preexec_fn`` it is a plain ProxyProcess (xprocess cannot take one).
    """
    started: List[ProxyProcess] = []
    request.node.stash[_PROXIES] = started

    def start(*args: str, **kwargs) -> ProxyProcess:
        index = len(started)
        if kwargs.get("preexec_fn") is not None:
            proxy = ProxyProcess(args, tmp_path / f"proxy-{index}.log", **kwargs)
        else:
            # One name per place in the test, reused by the next test: xprocess keeps
            # one control dir (and one open log) per name for the whole session.
            # Under pytest-xdist each worker process has its own names (and dirs).
            proxy = XProxy(xprocess, f"prefork-proxy-{_XDIST_WORKER}{index}", args, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for index, proxy in enumerate(started):
        proxy.stop(fast_after=2.0)  # a drain the test did not wait for is not its subject
        if isinstance(proxy, XProxy):  # collect the log: the next test reuses the name
            shutil.copyfile(proxy.log_path, tmp_path / f"proxy-{index}.log")
