"""Signalling and stopping the master's own child processes.

Called from the master's single thread only: by ``master`` (workers), ``upgrade``
(the new master it started), ``health`` (the health-check process) and
``admin.process`` (the admin process).  A child may already be gone, or already be
reaped by the master's ``reap()``; neither is an error here.
"""

from __future__ import annotations

import errno
import os
import signal
import time

#: How often ``stop`` looks whether the child has exited (nothing else to wait on).
POLL_S = 0.01


def kill_quietly(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid``; a process that is already gone is not an error."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except OSError as exc:  # pragma: no cover
        if exc.errno != errno.ESRCH:
            raise


def stop(pid: int, grace_s: float) -> None:
    """End a child within a bound: SIGTERM, then SIGKILL after ``grace_s``; reap it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped by the master's reap()
            return
        if done:
            return
        if time.monotonic() >= deadline:
            kill_quietly(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(POLL_S)  # a child's exit has nothing to wait on here but polling
