"""Fixtures shared by every test.  Helpers live in support.py (on sys.path via pytest config)."""

from __future__ import annotations

import resource
from typing import Callable, Iterator, List

import pytest
from support import BackendProcess, ProxyProcess

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


@pytest.fixture
def proxy_factory(tmp_path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start the real prefork-proxy CLI; every instance is stopped after the test."""
    started: List[ProxyProcess] = []

    def start(*args: str, **kwargs) -> ProxyProcess:
        proxy = ProxyProcess(args, tmp_path / f"proxy-{len(started)}.log", **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
