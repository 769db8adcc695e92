"""A cross-process mutex in shared memory that a killed holder cannot keep: ``RobustMutex``.

Who owns what.  The master creates one (``limits.ConnectionLimits`` does, before
the first fork) and every forked child inherits the same shared page; any thread
of any of them may ``acquire``/``release`` it, on the per-connection path.

Why not a kernel record lock (``limits.RecordLock``, ``shared.ProcessLock``): a
record lock costs a system call to take and one to give back, and a waiter
sleeps in the kernel's lock code until the holder's unlock wakes it.  Measured
in the HAProxy chain of issue 12's cost run (2 workers on 2 busy CPUs), the
worker spent 13.6 % of its samples in ``RecordLock.acquire``.  A POSIX mutex
in shared memory is one atomic instruction when nobody else holds it (no
system call; glibc's ``pthread_mutex_lock``), and a ``futex`` wait only when
somebody does.

Principle (a SIGKILL never leaves the lock taken): the mutex is *robust*
(``PTHREAD_MUTEX_ROBUST``).  The kernel keeps each thread's list of robust
mutexes it holds; when a holder dies, however it dies, the kernel marks the
mutex "owner died" and wakes a waiter, whose ``pthread_mutex_lock`` returns
``EOWNERDEAD``: it then owns the lock, marks it consistent and goes on, and
``owner_deaths`` counts it.  What the dead holder had half-written is for the
caller to repair (``ConnectionLimits`` rebuilds its counts from the ledgers
when the master reaps a worker whose row was left dirty), exactly as with a
record lock, which the kernel also drops at a holder's death.

``available()`` says whether this libc has robust process-shared mutexes
(glibc and musl do); ``ConnectionLimits`` falls back to ``RecordLock`` where not.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
from typing import Any, Callable, Optional, Tuple

log = logging.getLogger("prefork_proxy.limits")

#: Bytes reserved for a ``pthread_mutex_t`` (40 on x86_64 glibc, 48 on aarch64) and a
#: ``pthread_mutexattr_t`` (4 or 8): generous, so no ABI's type outgrows them.
MUTEX_BYTES = 64
ATTR_BYTES = 16
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1


def _bind_libc() -> Optional[Any]:
    """libc's pthread mutex functions with their C signatures, or None if any is missing."""
    try:
        libc = ctypes.CDLL(None)
        names = ("pthread_mutex_init", "pthread_mutex_lock", "pthread_mutex_unlock",
                 "pthread_mutex_consistent", "pthread_mutexattr_init",
                 "pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust",
                 "pthread_mutexattr_destroy")
        for name in names:
            function = getattr(libc, name)
            function.restype = ctypes.c_int
        for name in ("pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_consistent",
                     "pthread_mutexattr_init", "pthread_mutexattr_destroy"):
            getattr(libc, name).argtypes = [ctypes.c_void_p]
        libc.pthread_mutex_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        libc.pthread_mutexattr_setpshared.argtypes = [ctypes.c_void_p, ctypes.c_int]
        libc.pthread_mutexattr_setrobust.argtypes = [ctypes.c_void_p, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _bind_libc()


def available() -> bool:
    """Whether ``RobustMutex()`` can be made here."""
    return _LIBC is not None


class RobustMutex:
    """A robust, process-shared pthread mutex in its own shared page (see the module docstring).

    Not reentrant: a thread that holds it must not acquire it again.
    """

    def __init__(self) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "no robust process-shared pthread mutexes in this libc")
        # Anonymous, MAP_SHARED: the same physical page in every child forked after this.
        self._map = mmap.mmap(-1, mmap.PAGESIZE)
        cell = (ctypes.c_char * MUTEX_BYTES).from_buffer(self._map)
        self._cell = cell  # keeps the buffer export (and so the address) alive
        self._ptr = ctypes.c_void_p(ctypes.addressof(cell))
        attr = ctypes.create_string_buffer(ATTR_BYTES)
        _check(_LIBC.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        try:
            _check(_LIBC.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
                   "pthread_mutexattr_setpshared")
            _check(_LIBC.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
                   "pthread_mutexattr_setrobust")
            _check(_LIBC.pthread_mutex_init(self._ptr, attr), "pthread_mutex_init")
        finally:
            _LIBC.pthread_mutexattr_destroy(attr)
        # Bound once: the per-connection calls skip two attribute lookups each.
        self._lock_fn = _LIBC.pthread_mutex_lock
        self._unlock_fn = _LIBC.pthread_mutex_unlock
        #: How often this process took the lock over from a holder that had died.
        self.owner_deaths = 0

    def acquire(self) -> None:
        # ctypes releases the GIL around the call: a thread waiting here lets the
        # holder (maybe a thread of this same process) run on to its release.
        code = self._lock_fn(self._ptr)
        if code:
            self.took_over(code)

    def calls(self) -> Tuple[Callable[[], int], Callable[[], int]]:
        """``(lock, unlock)`` as two argument-less C calls, for a per-connection path:
        no Python frame around them.  ``lock()`` returns 0, or a code for ``took_over``."""
        return (functools.partial(self._lock_fn, self._ptr),
                functools.partial(self._unlock_fn, self._ptr))

    def took_over(self, code: int) -> None:
        """``pthread_mutex_lock`` returned ``code`` (not 0): the lock is ours if the
        holder died (``EOWNERDEAD``: mark it consistent); any other code raises."""
        if code != errno.EOWNERDEAD:
            raise OSError(code, f"pthread_mutex_lock: {os.strerror(code)}")
        # We hold it now; what the dead holder left half-done is the caller's to repair.
        _check(_LIBC.pthread_mutex_consistent(self._ptr), "pthread_mutex_consistent")  # type: ignore[union-attr]
        self.owner_deaths += 1
        log.warning("the connection limits' lock was held by a process that died; taken over")

    def release(self) -> None:
        code = self._unlock_fn(self._ptr)
        if code:
            raise OSError(code, f"pthread_mutex_unlock: {os.strerror(code)}")

    def __enter__(self) -> "RobustMutex":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check(code: int, what: str) -> None:
    if code:
        raise OSError(code, f"{what}: {os.strerror(code)}")
