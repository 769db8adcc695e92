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

import errno
import logging
import socket
from typing import Dict, List, Sequence, Tuple

from prefork_proxy.config import Endpoint, ListenerConfig
from prefork_proxy.errors import BindError

log = logging.getLogger("prefork_proxy.listeners")

#: Accept-queue length asked for; the kernel caps it at net.core.somaxconn.
BACKLOG = 4096


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

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
