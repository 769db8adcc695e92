"""The limits' cross-process lock (prefork_proxy.robust_mutex) across real forked processes."""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import pytest

from prefork_proxy import robust_mutex
from prefork_proxy.limits import ConnectionLimits, new_lock
from prefork_proxy.robust_mutex import RobustMutex

pytestmark = pytest.mark.skipif(not robust_mutex.available(),
                                reason="this libc has no robust process-shared mutexes")


def _child_holding(mutex: RobustMutex, release_on: int = -1) -> int:
    """Fork a child that takes ``mutex`` and holds it; its pid, once it holds it.

    With ``release_on`` (a pipe's read end) the child releases the lock when a byte
    arrives there; without, it holds it until it is killed.
    """
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_read)
            mutex.acquire()
            os.write(ready_write, b"x")
            if release_on >= 0:
                os.read(release_on, 1)
                mutex.release()
            else:
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(ready_write)
    assert os.read(ready_read, 1) == b"x", "the child died before it held the lock"
    os.close(ready_read)
    return pid


def test_a_holder_killed_with_sigkill_does_not_keep_the_lock():
    """The kernel hands a dead holder's robust mutex to the next locker (EOWNERDEAD),
    which owns it, marks it consistent, and counts the take-over."""
    mutex = RobustMutex()
    pid = _child_holding(mutex)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    mutex.acquire()  # would block for ever if the dead child kept it
    assert mutex.owner_deaths == 1
    mutex.release()
    with mutex:  # consistent again: an ordinary lock from now on
        pass
    assert mutex.owner_deaths == 1


def test_a_live_holder_excludes_another_process_until_it_releases():
    mutex = RobustMutex()
    pid = _child_holding(mutex)
    lock, unlock = mutex.calls()
    try:
        # The child holds it: a trylock from here must fail (EBUSY), without waiting.
        trylock = robust_mutex._LIBC.pthread_mutex_trylock  # type: ignore[union-attr]
        trylock.argtypes = [robust_mutex.ctypes.c_void_p]
        assert trylock(mutex._ptr) != 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    code = lock()
    assert code != 0  # EOWNERDEAD: ours now
    mutex.finish_acquire(code)
    assert unlock() == 0


def test_a_busy_lock_is_waited_for_with_the_interpreter_lock_released():
    """The trylock keeps the GIL; when it says EBUSY the wait must not keep it, or no
    other thread of the process could run (and a holder in this process could never
    release).  Here the main thread runs while a second thread waits, and it is the
    main thread that tells the holding child to let go."""
    mutex = RobustMutex()
    release_read, release_write = os.pipe()
    pid = _child_holding(mutex, release_on=release_read)
    held = threading.Event()

    def take_it() -> None:
        mutex.acquire()
        held.set()
        mutex.release()

    waiter = threading.Thread(target=take_it, daemon=True)
    try:
        waiter.start()
        # The waiter is blocked in the lock: this thread still runs Python code.
        assert not held.wait(0.2)
        os.write(release_write, b"x")
        assert held.wait(10), "the waiter never got the lock after the holder released it"
    finally:
        os.write(release_write, b"x")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        waiter.join(10)
        os.close(release_read)
        os.close(release_write)
    assert mutex.owner_deaths == 0


def test_the_uncontended_calls_keep_the_interpreter_lock():
    """The per-connection lock and unlock are PyDLL functions (no GIL hand-off per call)."""
    mutex = RobustMutex()
    lock, unlock = mutex.calls()
    for call in (lock, unlock):
        assert call.func._flags_ & ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    assert lock() == 0
    assert lock() != 0  # not reentrant: EBUSY (or EDEADLK), never a silent second hold
    assert unlock() == 0


def test_connection_limits_use_it_and_go_on_after_a_holder_was_killed():
    """A worker SIGKILLed while it held the limits' lock: the next acquire still answers."""
    limits = ConnectionLimits(sources=64, rows=8)
    assert isinstance(limits.lock, RobustMutex) and isinstance(new_lock(), RobustMutex)
    pid = _child_holding(limits.lock)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    token = limits.acquire(0, "192.0.2.1", max_connections=5, max_per_source=2)
    assert token >= 0 and limits.lock.owner_deaths == 1
    assert limits.release(token)
    assert limits.connections(0) == 0
