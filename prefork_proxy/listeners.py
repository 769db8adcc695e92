"""Listening sockets: binding them, and holding them for the master's whole life.

Owned by the master.  It binds every listener *before* forking; workers inherit
the file descriptors and accept from them, but never own them.

Principle: a listening socket has one accept queue, and closing the last
descriptor of it resets every connection still waiting in that queue.  The
master keeps its descriptor open for as long as it serves, so a worker that
dies, is killed, or retires closes only its own copy and no queued client is
ever reset.  ``SO_REUSEPORT`` is set so that a new set of sockets (a reload
that adds a listener, or a second instance during an upgrade) can bind the
same address beside the old one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from typing import Dict, List, Sequence, Tuple

from prefork_proxy.config import Endpoint, ListenerConfig
from prefork_proxy.errors import BindError

log = logging.getLogger("prefork_proxy.listeners")

#: Accept-queue length asked for; the kernel caps it at net.core.somaxconn.
BACKLOG = 4096
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
# One classic-BPF instruction, "return 0": drop the packet.
_DROP_ALL = (ctypes.c_ubyte * 8).from_buffer_copy(struct.pack("HBBI", 0x06, 0, 0, 0))


def stop_new_handshakes(sock: socket.socket) -> bool:
    """Freeze a listener's accept queue: new SYNs are dropped, queued clients stay.

    Principle: closing a listening socket resets every connection waiting in
    its queue.  Before a listener is closed for good, the master attaches a
    socket filter that drops every incoming packet on it: clients that have
    not finished their handshake just retransmit their SYN (and later find
    the port closed), while those the kernel already accepted stay queued
    until a worker accepts them.  Then the queue is empty when it is closed.
    Returns False where the kernel refuses the filter (not Linux).
    """
    program = struct.pack("HL", 1, ctypes.addressof(_DROP_ALL))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
        return True
    except OSError as exc:
        log.debug("cannot attach a drop filter to %s: %s", sock, exc)
        return False



def bind_listener(endpoint: Endpoint) -> socket.socket:
    """Bind and listen on ``endpoint``; raise ``BindError`` with a clear message on failure."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {endpoint}: cannot resolve host: {exc.strerror}") from None
    family, _, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One socket per address family: "[::]:5432" must not also grab 0.0.0.0:5432.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY from their listener (Linux and
        # the BSDs), which saves a system call per client: a relay forwards
        # each burst as it comes, so batching it in Nagle's algorithm would
        # only add latency.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use",
                  errno.EACCES: "permission denied (ports below 1024 need root or "
                                "CAP_NET_BIND_SERVICE)",
                  errno.EADDRNOTAVAIL: "address not available on this machine"}.get(
            exc.errno, exc.strerror or str(exc))
        raise BindError(f"cannot bind {endpoint}: {reason}") from None
    return sock


def bound_address(sock: socket.socket) -> str:
    """The address a socket really listens on (shows the real port when the config said 0)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenerSet:
    """The master's table of listening sockets, keyed by the endpoint as configured.

    ``open`` binds all of a config's listeners or none of them: if one fails,
    the ones bound so far are closed and the error is raised.  A listener on
    port 0 (the kernel picks the port, as tests do) is keyed by its position,
    since two of them are different sockets.
    """

    def __init__(self) -> None:
        self._sockets: Dict[Tuple[object, ...], socket.socket] = {}

    @staticmethod
    def _key(listener: ListenerConfig, index: int) -> Tuple[object, ...]:
        bind = listener.bind
        return (bind.host, bind.port) if bind.port else (bind.host, 0, index)

    def open(self, listeners: Sequence[ListenerConfig]) -> List[socket.socket]:
        """Bind what is not bound yet; return the sockets in the order of ``listeners``."""
        opened: List[Tuple[object, ...]] = []
        try:
            for index, listener in enumerate(listeners):
                key = self._key(listener, index)
                if key not in self._sockets:
                    self._sockets[key] = bind_listener(listener.bind)
                    opened.append(key)
        except BindError:
            for key in opened:
                self._sockets.pop(key).close()
            raise
        return [self._sockets[self._key(lst, i)] for i, lst in enumerate(listeners)]

    def retain(self, listeners: Sequence[ListenerConfig]) -> List[socket.socket]:
        """Stop handshakes on every socket ``listeners`` no longer uses; return them.

        The caller closes them with ``close_sockets`` once no worker that may
        still accept from them is alive, so their queues are empty by then.
        """
        keep = {self._key(lst, i) for i, lst in enumerate(listeners)}
        removed = []
        for key in [k for k in self._sockets if k not in keep]:
            sock = self._sockets.pop(key)
            stop_new_handshakes(sock)
            removed.append(sock)
        return removed

    def stop_new_handshakes(self) -> None:
        """Freeze every queue (graceful stop): the workers' last accept sweep empties them."""
        for sock in self._sockets.values():
            stop_new_handshakes(sock)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
