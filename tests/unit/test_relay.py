"""RelayLoop in-process over real loopback TCP sockets: splice (os and libc) and copy.

Each test runs one RelayLoop thread; a plain listening socket stands in for
the backend, so the test sees both ends of the relay.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from support import recv_exactly, recv_until_eof, wait_for

from prefork_proxy import splice as splice_module
from prefork_proxy.relay import RelayLoop, Target, choose_mode

MOVERS = {
    "os-splice": ("splice", splice_module.splice),
    "libc-splice": ("splice", splice_module.libc_splice),
    "copy": ("copy", None),
}


@pytest.fixture(params=list(MOVERS))
def relay(request):
    """A started RelayLoop plus a function that opens (client, backend-side) socket pairs.

    ``loop.splice_calls`` counts the bytes moved by the splice function, so a
    test can check that zero-copy really carried a bulk stream.
    """
    mode, function = MOVERS[request.param]
    if mode == "splice" and not splice_module.works(function):
        pytest.skip(f"{request.param} is not available here")
    spliced = [0]

    def counting_splice(src, dst, count, flags=0):
        moved = function(src, dst, count, flags)
        spliced[0] += moved
        return moved

    loop = RelayLoop(mode, splice=counting_splice if function else None)
    loop.spliced = spliced
    loop.start()
    backend_listener = socket.create_server(("127.0.0.1", 0))
    front_listener = socket.create_server(("127.0.0.1", 0))
    target = Target(socket.AF_INET, backend_listener.getsockname(), "test-backend")

    def open_pair():
        client = socket.create_connection(front_listener.getsockname(), timeout=10)
        accepted, address = front_listener.accept()
        accepted.setblocking(False)
        loop.submit(accepted, iter([target]), 5.0, f"{address[0]}:{address[1]}")
        backend, _ = backend_listener.accept()
        backend.settimeout(10)
        return client, backend

    yield loop, open_pair
    loop.stop()
    assert loop.join(5)
    backend_listener.close()
    front_listener.close()


def test_bytes_cross_both_ways_exactly(relay):
    loop, open_pair = relay
    client, backend = open_pair()
    up, down = os.urandom(3 << 20), os.urandom(2 << 20)
    sender = threading.Thread(target=client.sendall, args=(up,))
    sender.start()
    backend_sender = threading.Thread(target=backend.sendall, args=(down,))
    backend_sender.start()
    assert recv_exactly(backend, len(up)) == up
    assert recv_exactly(client, len(down)) == down
    sender.join(10)
    backend_sender.join(10)
    if loop.mode == "splice":  # the bulk of both streams went through pipes (x2: in and out)
        assert loop.spliced[0] >= len(up) + len(down)
    client.close()
    backend.close()


def test_half_close_each_way(relay):
    loop, open_pair = relay
    client, backend = open_pair()
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(backend) == b"request"  # EOF crossed as EOF
    backend.sendall(b"answer after EOF" * 1000)  # the other way still flows
    backend.close()
    assert recv_until_eof(client) == b"answer after EOF" * 1000
    wait_for(lambda: loop.active == 0, 5, message="the connection to be released")
    client.close()


def test_reset_closes_the_other_side(relay):
    loop, open_pair = relay
    client, backend = open_pair()
    client.sendall(b"x")
    assert recv_exactly(backend, 1) == b"x"
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    backend.close()  # RST
    client.settimeout(2)
    start = time.monotonic()
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < 1.0
    wait_for(lambda: loop.active == 0, 5, message="the connection to be released")
    client.close()


def _thread_cpu_seconds(native_id: int) -> float:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_backpressure_bounds_memory_and_does_not_spin(relay):
    """A backend that stops reading: the relay stops reading the client and sleeps."""
    loop, open_pair = relay
    client, backend = open_pair()
    client.setblocking(False)
    chunk = b"\0" * 65536
    sent = 0
    # Write until the whole path is full: client send buffer, relay pipe or
    # buffer, backend receive buffer.  Bounded by the deadline.
    deadline = time.monotonic() + 10
    stalled_since = None
    while time.monotonic() < deadline:
        try:
            sent += client.send(chunk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            time.sleep(0.01)
    # Everything sent is held by kernel buffers plus one pipe or buffer: a few MiB, not more.
    assert sent < 64 << 20, f"{sent} bytes accepted: the relay is not applying backpressure"
    cpu_before = _thread_cpu_seconds(loop._thread.native_id)
    wall_before = time.monotonic()
    wait_for(lambda: time.monotonic() - wall_before >= 0.5, 2, message="half a second")
    burned = _thread_cpu_seconds(loop._thread.native_id) - cpu_before
    assert burned < 0.1, f"relay thread burned {burned:.2f} s while stuck: it spins"
    # Once the backend reads again, every byte arrives.
    client.setblocking(True)
    client.shutdown(socket.SHUT_WR)
    assert len(recv_until_eof(backend)) == sent
    client.close()
    backend.close()


def test_refused_target_closes_client_and_tries_the_next(relay):
    loop, open_pair = relay
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = Target(socket.AF_INET, unused.getsockname(), "dead")
        front = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(front.getsockname(), timeout=5)
        accepted, _ = front.accept()
        accepted.setblocking(False)
        loop.submit(accepted, iter([dead]), 5.0)
        assert client.recv(10) == b""  # closed cleanly, not left hanging
        # With a live target after the dead one, the client is served.
        live_listener = socket.create_server(("127.0.0.1", 0))
        live = Target(socket.AF_INET, live_listener.getsockname(), "live")
        client2 = socket.create_connection(front.getsockname(), timeout=5)
        accepted2, _ = front.accept()
        accepted2.setblocking(False)
        loop.submit(accepted2, iter([dead, live]), 5.0)
        backend, _ = live_listener.accept()
        client2.sendall(b"hello")
        assert recv_exactly(backend, 5) == b"hello"
        for sock in (client, client2, backend, live_listener, front):
            sock.close()


def test_idle_connections_hold_no_pipes_or_buffers(relay):
    loop, open_pair = relay
    pairs = [open_pair() for _ in range(50)]
    for client, backend in pairs:
        client.sendall(b"abc")
        assert recv_exactly(backend, 3) == b"abc"
        backend.sendall(b"def")
        assert recv_exactly(client, 3) == b"def"
    if loop.mode == "splice":  # small bursts are copied: a pipe would cost more
        assert loop.spliced[0] == 0
    # Every direction went idle, so its pipe or buffer went back to the pool.
    pool = loop._buffers
    wait_for(lambda: len(pool._idle) <= 4, 5, message="idle pool to stay small")
    open_fds = len(os.listdir("/proc/self/fd"))
    assert open_fds < 50 * 2 * 2 + 64  # two sockets per pair on each side, no pipes
    for client, backend in pairs:
        client.close()
        backend.close()


def test_choose_mode():
    assert choose_mode("copy") == "copy"
    assert choose_mode("auto") == ("splice" if splice_module.SPLICE_SUPPORTED else "copy")


class _ExhaustedPipePool:
    """A pool that behaves as when the process is out of file descriptors."""

    def take(self):
        raise OSError(24, "Too many open files")

    def give_back(self, pipe, empty):  # pragma: no cover - never lent anything
        raise AssertionError("nothing was lent")


def test_splice_direction_without_a_pipe_falls_back_to_read_write():
    from prefork_proxy.relay import Direction, SpliceMover

    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    for sock in (src, dst):
        sock.setblocking(False)
    try:
        from prefork_proxy.relay import BufferPool

        mover = SpliceMover(_ExhaustedPipePool(), BufferPool(), splice_module.splice)
        mover.bulk = True  # as if a bulk stream had begun: it must then want a pipe
        direction = Direction(src, dst, mover, by_fd=True)
        payload = os.urandom(200_000)
        src_peer.sendall(payload[:100_000])
        received = bytearray()
        while len(received) < 100_000:
            assert direction.pump() == "read"
            received += dst_peer.recv(1 << 20)
        src_peer.sendall(payload[100_000:])
        src_peer.shutdown(socket.SHUT_WR)
        dst_peer.settimeout(5)
        while direction.pump() != "done":
            pass
        received += recv_until_eof(dst_peer)
        assert bytes(received) == payload
    finally:
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()
