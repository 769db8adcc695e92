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

Which calls keep the interpreter lock.  The uncontended path (``pthread_mutex_trylock``,
``pthread_mutex_unlock``) goes through ``ctypes.PyDLL``, which keeps the GIL across
the call: neither call can block, and a ``CDLL`` call's release and re-take of the
GIL is itself a ``futex`` hand-off whenever another thread of the worker wants the
interpreter (measured in the chain's limit-only worker: 0.185 futex calls per
connection with CDLL calls, 0.10 with these).  Only when the trylock says EBUSY does
``finish_acquire`` wait in a ``CDLL`` ``pthread_mutex_lock``, with the GIL released,
so the holder (maybe a thread of this same process) can run on to its release.

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


def _bind(libc: Any, names: Tuple[str, ...]) -> None:
    """Give libc's pthread functions ``names`` their C signatures.

    AttributeError if this libc lacks one of them.
    """
    for name in names:
        function = getattr(libc, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p]
    for name, second in (("pthread_mutex_init", ctypes.c_void_p),
                         ("pthread_mutexattr_setpshared", ctypes.c_int),
                         ("pthread_mutexattr_setrobust", ctypes.c_int)):
        if name in names:
            getattr(libc, name).argtypes = [ctypes.c_void_p, second]


def _bind_libc() -> Tuple[Optional[Any], Optional[Any]]:
    """libc as ``(CDLL, PyDLL)``: the first releases the GIL around a call (for the
    calls that may wait), the second keeps it (for the two that cannot); ``(None,
    None)`` if a function is missing."""
    try:
        releasing = ctypes.CDLL(None)
        _bind(releasing, ("pthread_mutex_init", "pthread_mutex_lock", "pthread_mutex_consistent",
                          "pthread_mutexattr_init", "pthread_mutexattr_setpshared",
                          "pthread_mutexattr_setrobust", "pthread_mutexattr_destroy"))
        keeping = ctypes.PyDLL(None)
        _bind(keeping, ("pthread_mutex_trylock", "pthread_mutex_unlock"))
        return releasing, keeping
    except (OSError, AttributeError):
        return None, None


_LIBC, _LIBC_KEEPING_GIL = _bind_libc()


def available() -> bool:
    """Whether ``RobustMutex()`` can be made here."""
    return _LIBC is not None and _LIBC_KEEPING_GIL is not None


class RobustMutex:
    """A robust, process-shared pthread mutex in its own shared page (see the module docstring).

    Not reentrant: a thread that holds it must not acquire it again.
    """

    def __init__(self) -> None:
        if _LIBC is None or _LIBC_KEEPING_GIL is None:
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
        self._trylock_fn = _LIBC_KEEPING_GIL.pthread_mutex_trylock
        self._wait_fn = _LIBC.pthread_mutex_lock
        self._unlock_fn = _LIBC_KEEPING_GIL.pthread_mutex_unlock
        #: How often this process took the lock over from a holder that had died.
        self.owner_deaths = 0

    def acquire(self) -> None:
        code = self._trylock_fn(self._ptr)
        if code:
            self.finish_acquire(code)

    def calls(self) -> Tuple[Callable[[], int], Callable[[], int]]:
        """``(lock, unlock)`` as two argument-less C calls that keep the GIL, for a
        per-connection path: no Python frame around them.  ``lock()`` is a trylock:
        it returns 0 (held), or a code that the caller must pass to ``finish_acquire``
        before it holds the lock."""
        return (functools.partial(self._trylock_fn, self._ptr),
                functools.partial(self._unlock_fn, self._ptr))

    def finish_acquire(self, code: int) -> None:
        """The trylock returned ``code`` (not 0); return once the lock is ours.

        EBUSY: someone holds it; wait in ``pthread_mutex_lock`` with the GIL released
        (the holder may be a thread of this process, which needs the GIL to release it).
        EOWNERDEAD (from either call): the holder died; the lock is ours, marked
        consistent and counted.  Any other code raises.
        """
        if code == errno.EBUSY:
            code = self._wait_fn(self._ptr)
            if not code:
                return
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
