"""Listening sockets: binding them, and holding them for the master's whole life.

Owned by the master.  It binds every listener *before* forking; workers inherit
the file descriptors and accept from them, but never own them.  Elsewhere:
``listener_key`` (the one listener identity) is also used by ``shared`` in the
master, and a worker whose master died calls ``stop_new_handshakes`` on its
main thread.

Principle: a listening socket has one accept queue, and closing the last
descriptor of it resets every connection still waiting in that queue.  The
master keeps its descriptor open for as long as it serves, so a worker that
dies, is killed, or retires closes only its own copy and no queued client is
ever reset.  ``SO_REUSEPORT`` is set, yet a new address is first probed
without it (``check_not_in_use``), so another process already listening there
is an error ("address already in use") unless the listener says
``reuse_port = true``; our own reloads never need to share, since the
``ListenerSet`` keeps the socket of every address it still (or again) serves.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
from typing import Dict, List, Optional, Sequence, Tuple

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



def allow_new_handshakes(sock: socket.socket) -> None:
    """Undo ``stop_new_handshakes``: a removed listener that a reload adds back."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:  # ENOENT: no filter was attached
        log.debug("cannot detach the drop filter of %s: %s", sock, exc)


#: An address as the kernel sees it: (family, proto, sockaddr).
Resolved = Tuple[int, int, tuple]


def resolve(endpoint: Endpoint) -> Resolved:
    """The address ``bind_listener`` binds for ``endpoint`` (the first getaddrinfo answer)."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise BindError(f"cannot bind {endpoint}: cannot resolve host: {reason}") from None
    family, _, proto, _, sockaddr = infos[0]
    return family, proto, sockaddr


#: A listener's identity: the same key in the master's socket table and in shared state.
ListenerKey = Tuple[object, ...]


def listener_key(listener: ListenerConfig, index: int,
                 address: Optional[Resolved] = None) -> ListenerKey:
    """Who a listener is, across reloads: the address as the kernel sees it.

    ``(family, IP, port[, scope id])``, so ``localhost:6380`` and
    ``127.0.0.1:6380`` are one listener and a reload that respells an address
    keeps its socket, its rotation and its counters.  A listener on port 0
    (the kernel picks the port, as tests do) is keyed by its position, since
    two of them are different sockets.  ``address``: ``resolve(listener.bind)``
    when the caller has it already.
    """
    family, _, sockaddr = address or resolve(listener.bind)
    if not listener.bind.port:
        return ("port 0", index, family, sockaddr[0])
    return (family,) + tuple(sockaddr[:2]) + tuple(sockaddr[3:4])  # scope id for IPv6


def _bind_error(endpoint: Endpoint, exc: OSError) -> BindError:
    reason = {errno.EADDRINUSE: "address already in use",
              errno.EACCES: "permission denied (ports below 1024 need root or "
                            "CAP_NET_BIND_SERVICE)",
              errno.EADDRNOTAVAIL: "address not available on this machine"}.get(
        exc.errno, exc.strerror or str(exc))
    return BindError(f"cannot bind {endpoint}: {reason}")


def check_not_in_use(endpoint: Endpoint, address: Resolved) -> None:
    """Raise ``BindError`` if another socket already listens on ``address``.

    Principle (no silent sharing): the real listener is bound with
    SO_REUSEPORT, which lets any process of the same user bind the same
    address beside it, and the kernel would then split the clients between
    the two.  A probe bound *without* SO_REUSEPORT (with SO_REUSEADDR, so
    TIME_WAIT leftovers do not count) fails with EADDRINUSE exactly when a
    socket already listens there, whoever owns it; the probe never listens and
    is closed at once.  (``localhost:80`` and ``127.0.0.1:80`` resolve to the
    same address, so they collide here too.)
    """
    family, proto, sockaddr = address
    probe = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"cannot bind {endpoint}: address already in use: another "
                            f"process listens on {_show(address)} (set reuse_port = true in "
                            "this [[tcp_proxy]] section if sharing it is intended)") from None
        raise _bind_error(endpoint, exc) from None
    finally:
        probe.close()


def _show(address: Resolved) -> str:
    host, port = address[2][:2]
    return f"[{host}]:{port}" if address[0] == socket.AF_INET6 else f"{host}:{port}"


def bind_listener(endpoint: Endpoint, address: Optional[Resolved] = None) -> socket.socket:
    """Bind and listen on ``endpoint``; raise ``BindError`` with a clear message on failure."""
    family, proto, sockaddr = address or resolve(endpoint)
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
        raise _bind_error(endpoint, exc) from None
    return sock


def bound_address(sock: socket.socket) -> str:
    """The address a socket really listens on (shows the real port when the config said 0)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ListenerSet:
    """The master's table of listening sockets, keyed by the address they bind.

    The key is ``listener_key``, the same identity shared state uses.

    ``open`` binds all of a config's listeners or none of them: if one fails,
    the ones bound so far are closed and the error is raised.  ``retain``
    moves the sockets a reload no longer uses to a retired table (their
    queues frozen) until ``close_retired``; a reload that adds such an address
    back takes its retired socket back, so no second socket ever joins its
    SO_REUSEPORT group while the old one is still open and filtered (clients
    hashed to the filtered one would hang).

    ``adopt`` gives it sockets bound by another process (the master this one
    upgrades, see ``handover``; or systemd): ``open`` takes such a socket for
    its key instead of binding, so the address is never re-bound.
    """

    def __init__(self) -> None:
        self._sockets: Dict[ListenerKey, socket.socket] = {}
        self._retired: Dict[ListenerKey, socket.socket] = {}
        # Sockets handed to this master (by the master it upgrades, or by systemd),
        # taken by the first ``open`` that needs their key instead of binding.
        self._inherited: Dict[ListenerKey, socket.socket] = {}

    def adopt(self, sockets: Dict[ListenerKey, socket.socket]) -> None:
        """Take listening sockets another process bound, keyed as ``listener_key`` keys them.

        ``open`` then uses the socket of a key instead of binding one, and
        skips the in-use probe for it: the socket already listening there is
        this very one.  Called once, before the first ``open``.
        """
        self._inherited.update(sockets)

    def adopt_by_address(self, sockets: Sequence[socket.socket]) -> None:
        """``adopt`` sockets known only by the address they listen on (systemd's)."""
        for sock in sockets:
            sockaddr = sock.getsockname()
            key = (int(sock.family),) + tuple(sockaddr[:2]) + tuple(sockaddr[3:4])
            self._inherited[key] = sock

    def close_unadopted(self) -> List[str]:
        """Close the inherited sockets the config did not claim; return their addresses."""
        closed = [bound_address(sock) for sock in self._inherited.values()]
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()
        return closed

    def named(self) -> Dict[ListenerKey, socket.socket]:
        """The serving sockets by key (not the retired ones): what an upgrade hands over."""
        return dict(self._sockets)

    def open(self, listeners: Sequence[ListenerConfig]) -> List[socket.socket]:
        """Bind what is not bound yet; return the sockets in the order of ``listeners``."""
        addresses = [resolve(listener.bind) for listener in listeners]
        keys = [listener_key(lst, i, a) for i, (lst, a) in enumerate(zip(listeners, addresses))]
        seen: Dict[ListenerKey, ListenerConfig] = {}
        for listener, key, address in zip(listeners, keys, addresses):
            if key in seen:
                raise BindError(f"cannot bind {listener.bind}: {seen[key].bind} in another "
                                f"[[tcp_proxy]] section binds the same address "
                                f"({_show(address)})")
            seen[key] = listener
        fresh = [(lst, key, address) for lst, key, address in zip(listeners, keys, addresses)
                 if key not in self._sockets and key not in self._retired
                 and key not in self._inherited]
        # Probe every new address before binding any: a listener of this very
        # config (0.0.0.0:P beside 127.0.0.1:P) must not look like another process.
        for listener, _, address in fresh:
            if listener.bind.port and not listener.reuse_port \
                    and not self._overlaps_ours(address):
                check_not_in_use(listener.bind, address)
        opened: List[ListenerKey] = []
        revived: List[ListenerKey] = []
        adopted: List[ListenerKey] = []
        try:
            for listener, key, address in zip(listeners, keys, addresses):
                if key in self._sockets:
                    continue
                if key in self._inherited:
                    self._sockets[key] = self._inherited.pop(key)
                    adopted.append(key)
                elif key in self._retired:
                    sock = self._retired.pop(key)
                    allow_new_handshakes(sock)
                    self._sockets[key] = sock
                    revived.append(key)
                    log.info("listener %s is back in the config: it keeps its socket",
                             listener.bind)
                else:
                    self._sockets[key] = bind_listener(listener.bind, address)
                    opened.append(key)
        except BindError:
            for key in opened:
                self._sockets.pop(key).close()
            for key in revived:
                sock = self._retired[key] = self._sockets.pop(key)
                stop_new_handshakes(sock)
            for key in adopted:  # never closed here: another master may serve them
                self._inherited[key] = self._sockets.pop(key)
            raise
        return [self._sockets[key] for key in keys]

    def _overlaps_ours(self, address: Resolved) -> bool:
        """Whether one of our own sockets (serving or retired) shares the port with a
        wildcard on either side: the probe could not tell it from another process."""
        family, _, sockaddr = address
        wildcards = ("0.0.0.0", "::")
        ours = list(self._sockets.values()) + list(self._retired.values()) \
            + list(self._inherited.values())
        for sock in ours:
            if sock.family != family:
                continue
            host, port = sock.getsockname()[:2]
            if port == sockaddr[1] and (host in wildcards or sockaddr[0] in wildcards):
                return True
        return False

    def retain(self, keep: Sequence[socket.socket]) -> List[socket.socket]:
        """Retire every socket not in ``keep`` (what ``open`` returned for the new
        config): stop its handshakes and hold it until ``close_retired``.

        The caller closes them once no worker that may still accept from them
        is alive, so their queues are empty by then.  Returns them.
        """
        kept = {id(sock) for sock in keep}
        removed = []
        for key in [k for k, sock in self._sockets.items() if id(sock) not in kept]:
            sock = self._sockets.pop(key)
            stop_new_handshakes(sock)
            self._retired[key] = sock
            removed.append(sock)
        return removed

    def has_retired(self) -> bool:
        return bool(self._retired)

    def close_retired(self) -> None:
        """Close the retired sockets: their addresses are no longer bound."""
        for sock in self._retired.values():
            sock.close()
        self._retired.clear()

    def stop_new_handshakes(self) -> None:
        """Freeze every queue (graceful stop): the workers' last accept sweep empties them."""
        for sock in self._sockets.values():
            stop_new_handshakes(sock)

    def close(self) -> None:
        """Close this master's descriptors.  Another master that holds the same
        sockets (an upgrade) keeps them, and their queues, open."""
        self.close_retired()
        self.close_unadopted()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
