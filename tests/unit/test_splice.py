"""The splice binding: os.splice and the ctypes libc fallback behave alike."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from prefork_proxy import splice as splice_module
from prefork_proxy.splice import SPLICE_F_NONBLOCK

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="splice is Linux")


@linux_only
def test_splice_is_supported_on_linux():
    assert splice_module.SPLICE_SUPPORTED
    assert splice_module.libc_splice is not None


@linux_only
@pytest.mark.parametrize("name", ["splice", "libc_splice"])
def test_splice_moves_bytes_and_reports_eagain_and_eof(name):
    function = getattr(splice_module, name)
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        right.setblocking(False)
        left.sendall(b"zero-copy")
        assert function(right.fileno(), write_end, 65536, SPLICE_F_NONBLOCK) == 9
        assert os.read(read_end, 9) == b"zero-copy"
        with pytest.raises(BlockingIOError):
            function(right.fileno(), write_end, 65536, SPLICE_F_NONBLOCK)
        left.shutdown(socket.SHUT_WR)
        assert function(right.fileno(), write_end, 65536, SPLICE_F_NONBLOCK) == 0
    finally:
        os.close(read_end)
        os.close(write_end)
        left.close()
        right.close()


@linux_only
def test_libc_splice_raises_oserror_subclasses():
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError) as raised:
            splice_module.libc_splice(read_end, read_end, 10, 0)  # pipe to itself: EINVAL
        assert raised.value.errno is not None
    finally:
        os.close(read_end)
        os.close(write_end)


@linux_only
def test_pipe_can_grow():
    read_end, write_end = os.pipe()
    try:
        assert splice_module.set_pipe_size(write_end, 1 << 20) >= 65536
    finally:
        os.close(read_end)
        os.close(write_end)
