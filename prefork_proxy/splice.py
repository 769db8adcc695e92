"""The ``splice(2)`` system call, from ``os.splice`` or from libc through ``ctypes``.

Called from relay threads.  ``os.splice`` exists on Linux from Python 3.10; on
older Pythons the same call is made through a ``ctypes`` binding to libc's
``splice``, which also releases the GIL while the kernel works.  Both raise
``OSError`` subclasses exactly like ``os`` functions do (``BlockingIOError`` for
``EAGAIN``, ``ConnectionResetError`` for ``ECONNRESET``, ...).

``SPLICE_SUPPORTED`` says whether this process can splice at all; it is probed
once at import by splicing a byte from a socket pair into a pipe, so a kernel
or sandbox that refuses splice on sockets is detected before any connection
depends on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import sys
from typing import Callable, Optional

SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
SPLICE_F_MORE = 4
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032

SpliceFunction = Callable[[int, int, int, int], int]


def _load_libc_splice() -> Optional[SpliceFunction]:
    """A ``ctypes`` binding to libc ``splice``, or None where libc has none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        c_splice = libc.splice
    except (OSError, AttributeError):
        return None
    c_splice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                         ctypes.c_size_t, ctypes.c_uint]
    c_splice.restype = ctypes.c_ssize_t

    def libc_splice(src: int, dst: int, count: int, flags: int = 0) -> int:
        result = c_splice(src, None, dst, None, count, flags)
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))  # OSError() picks the errno's subclass
        return result

    return libc_splice


def _os_splice(src: int, dst: int, count: int, flags: int = 0) -> int:
    return os.splice(src, dst, count, flags=flags)  # type: ignore[attr-defined]


libc_splice: Optional[SpliceFunction] = _load_libc_splice()

#: The splice implementation this process uses, or None where splice is unavailable.
splice: Optional[SpliceFunction] = _os_splice if hasattr(os, "splice") else libc_splice


def works(function: Optional[SpliceFunction]) -> bool:
    """Whether ``function`` really splices a socket into a pipe here (kernel and sandbox)."""
    if function is None:
        return False
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        left.sendall(b"x")
        right.setblocking(False)
        return function(right.fileno(), write_end, 1, SPLICE_F_NONBLOCK) == 1 \
            and os.read(read_end, 1) == b"x"
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()


SPLICE_SUPPORTED: bool = works(splice)


def set_pipe_size(write_end: int, size: int) -> int:
    """Grow a pipe to ``size`` bytes where allowed; return the size it really has.

    Growing can fail (``EPERM`` once a non-root user's pipes pass
    ``/proc/sys/fs/pipe-user-pages-soft``); the pipe then keeps its default size.
    """
    try:
        return fcntl.fcntl(write_end, F_SETPIPE_SZ, size)
    except OSError:
        return fcntl.fcntl(write_end, F_GETPIPE_SZ)
