"""Fault injection for tests: make a named step raise, in the real processes.

Off unless the environment variable ``PREFORK_PROXY_TEST_FAULTS`` names a
directory when the module is imported (the CLI process; workers and the
health-check process inherit it through fork).  Then ``trip(point)`` raises
when a file named after the point exists in that directory:

- ``DIR/POINT``: raises once; the process that removes the file raises, so
  exactly one caller trips even when several processes reach the point;
- ``DIR/POINT.always``: raises every time, for as long as the file exists.

Points (grep for ``faults.trip``): ``master.<step>`` for each step of the
master loop (``master.signal``, ``master.reap``, ``master.supervise``,
``master.manage_workers``, ``master.reload_progress``, ``master.health``,
``master.write_status``, ``master.close_sockets``), ``master.reload`` (a
reload fails after ``shared.reconfigure``), ``master.fork`` (a
worker's ``fork`` fails with EAGAIN), ``health.fork`` (the health-check
process's ``fork`` fails with EAGAIN), ``worker.boot`` (a worker fails to
boot, exit code 3), ``worker.signal`` (a worker's signal handling raises).

Principle: deterministic, unlike resource limits (RLIMIT_NPROC does not bind
root, memory limits fail wherever memory runs out first).  The cost when off
is one test of a module constant per call, and no call sits on the relay's hot
path (master loop steps, forks, worker boot only).
"""

from __future__ import annotations

import os
from typing import Optional

ENV = "PREFORK_PROXY_TEST_FAULTS"
_DIRECTORY: Optional[str] = os.environ.get(ENV) or None


class InjectedFault(RuntimeError):
    """What ``trip`` raises unless the caller names a more realistic exception."""


def trip(point: str, exc: Optional[BaseException] = None) -> None:
    """Raise ``exc`` (or ``InjectedFault``) if the test asked for a fault at ``point``."""
    if _DIRECTORY is None:
        return
    base = os.path.join(_DIRECTORY, point)
    if not os.path.exists(base + ".always"):
        try:
            os.unlink(base)
        except OSError:
            return
    raise exc if exc is not None else InjectedFault(f"injected fault at {point}")
