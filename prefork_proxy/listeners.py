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

Principle (a unix listener's file is ours from bind to the final stop): a
``unix:/path`` listener is one socket shared by every worker (SO_REUSEPORT
means nothing for AF_UNIX).  The master creates its file (born 0600 under a
umask, then given the listener's ``mode`` and, when the master runs as root,
the serving user as owner, all before ``listen``, so nobody connects before
the permissions are right).  A file left at the path by a crash is removed
only if nothing accepts on it (``connect`` is refused); one something accepts
on is "address in use".  The file is unlinked when the socket stops taking
new clients for good: a reload that removes the listener, a graceful stop
(the unix counterpart of the drop filter: a client finds no file instead of
a queue nobody will accept from), the final close; never by a master whose
sockets another master took over (an upgrade: the file is the successor's).
Only a file that is still the very one we bound (same device and inode) is
unlinked, so a path another process took since is left alone.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import stat
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
    if endpoint.path:
        return socket.AF_UNIX, 0, endpoint.path  # type: ignore[return-value]
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
    if family == socket.AF_UNIX:
        return (family, sockaddr)  # the path
    if not listener.bind.port:
        return ("port 0", index, family, sockaddr[0])
    return (family,) + tuple(sockaddr[:2]) + tuple(sockaddr[3:4])  # scope id for IPv6


def _bind_error(endpoint: Endpoint, exc: OSError) -> BindError:
    if endpoint.path and exc.errno in (errno.EACCES, errno.ENOENT):
        reason = ("permission denied (its directory must be writable by this user)"
                  if exc.errno == errno.EACCES else "its directory does not exist")
        return BindError(f"cannot bind {endpoint}: {reason}")
    reason = {errno.EADDRINUSE: "address already in use",
              errno.EACCES: "permission denied (ports below 1024 need root or "
                            "CAP_NET_BIND_SERVICE)",
              errno.EADDRNOTAVAIL: "address not available on this machine"}.get(
        exc.errno, exc.strerror or str(exc))
    return BindError(f"cannot bind {endpoint}: {reason}")


def check_not_in_use(endpoint: Endpoint, address: Resolved, v6only: bool = True) -> None:
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
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
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
    if address[0] == socket.AF_UNIX:
        return f"unix:{address[2]}"
    host, port = address[2][:2]
    return f"[{host}]:{port}" if address[0] == socket.AF_INET6 else f"{host}:{port}"


def claim_unix_path(endpoint: Endpoint) -> None:
    """Make ``endpoint``'s path free to bind, or raise ``BindError`` saying why not.

    Nothing there: free.  A socket file nothing accepts on (``connect``
    refused: the leftover of a crash, or of a ``kill -9``): removed, and
    logged.  A socket something accepts on (or whose queue is full): "address
    in use".  Anything else (a regular file, a directory): left alone, an error.
    """
    path = endpoint.path
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _bind_error(endpoint, exc) from None
    if not stat.S_ISSOCK(info.st_mode):
        raise BindError(f"cannot bind {endpoint}: the path exists and is not a socket "
                        "(remove it, or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a unix connect never waits: queued, refused, or EAGAIN
    try:
        code = probe.connect_ex(path)
    finally:
        probe.close()
    if code in (errno.ECONNREFUSED, errno.ENOENT):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise BindError(f"cannot bind {endpoint}: cannot remove the stale socket file: "
                            f"{exc.strerror}") from None
        log.warning("listener %s: removed a stale socket file (nothing listened on it)",
                    endpoint)
        return
    if code in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise BindError(f"cannot bind {endpoint}: address already in use: another process "
                        "listens on this socket file")
    raise BindError(f"cannot bind {endpoint}: cannot tell whether the existing socket file is "
                    f"in use: {os.strerror(code)}")


def _bind_unix(endpoint: Endpoint, mode: int,
               owner: Optional[Tuple[int, int]]) -> socket.socket:
    """A listening unix socket at ``endpoint.path`` with ``mode`` and ``owner``, set
    before ``listen`` (see the module docstring); the path was claimed first."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = endpoint.path
    try:
        # Born 0600: no moment where the file exists with looser permissions.
        # (The umask is process-wide; the master binds with no other thread
        # creating files.)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            if owner is not None and os.geteuid() == 0:
                os.chown(path, owner[0], owner[1])
            os.chmod(path, mode)
            sock.listen(BACKLOG)
        except OSError:
            _unlink_quietly(path)
            raise
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise _bind_error(endpoint, exc) from None
    return sock


def _file_id(path: str) -> Optional[Tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _unlink_quietly(path: str) -> None:
    """Remove a socket file of ours; one that cannot be (the serving user may not
    write its directory) is logged: the next start removes it as stale."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the socket file %s: %s (the next start removes it as "
                    "stale; give the serving user a directory it may write)", path,
                    exc.strerror)


def bind_listener(endpoint: Endpoint, address: Optional[Resolved] = None, *,
                  v6only: bool = True, mode: int = 0o660,
                  owner: Optional[Tuple[int, int]] = None) -> socket.socket:
    """Bind and listen on ``endpoint``; raise ``BindError`` with a clear message on failure.

    ``v6only``: an IPv6 socket's IPV6_V6ONLY; ``mode``/``owner`` (uid, gid): a
    unix socket's file (its path claimed with ``claim_unix_path`` first).
    """
    if endpoint.path:
        return _bind_unix(endpoint, mode, owner)
    family, proto, sockaddr = address or resolve(endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # One socket per address family: "[::]:5432" must not also grab 0.0.0.0:5432
            # (unless the listener says v6only = false).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
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
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
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

    Unix listeners (see the module docstring): ``_files`` holds the file of
    each unix socket (device, inode), so only that file is ever unlinked.  A
    retired unix socket has its file unlinked at once and is kept under a key
    of its own, so a reload that adds the path back binds a fresh socket there.
    ``owner`` (uid, gid), set by the master: who a new unix socket's file
    belongs to (applied while the master is root).
    """

    def __init__(self) -> None:
        self._sockets: Dict[ListenerKey, socket.socket] = {}
        self._retired: Dict[ListenerKey, socket.socket] = {}
        # Sockets handed to this master (by the master it upgrades, or by systemd),
        # taken by the first ``open`` that needs their key instead of binding.
        self._inherited: Dict[ListenerKey, socket.socket] = {}
        self._files: Dict[int, Tuple[str, Optional[Tuple[int, int]]]] = {}  # by id(sock)
        self.owner: Optional[Tuple[int, int]] = None

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
            if sock.family == socket.AF_UNIX:
                key: ListenerKey = (int(sock.family), sockaddr)
            else:
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
        dual_ports = {a[2][1]: lst for lst, a in zip(listeners, addresses)
                      if a[0] == socket.AF_INET6 and not lst.v6only and lst.bind.port}
        for listener, address in zip(listeners, addresses):
            if address[0] == socket.AF_INET and address[2][1] in dual_ports:
                raise BindError(f"cannot bind {listener.bind}: {dual_ports[address[2][1]].bind} "
                                "with v6only = false takes IPv4 clients on that port too "
                                "(set v6only = true to have both)")
        for listener, key in zip(listeners, keys):
            held = self._sockets.get(key) or self._retired.get(key) or self._inherited.get(key)
            if held is not None and held.family == socket.AF_INET6 and bool(held.getsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)) != listener.v6only:
                # The option cannot change on a listening socket, and a second socket
                # beside it would split the clients: said, not silently ignored.
                raise BindError(f"cannot change v6only of {listener.bind} on its live socket "
                                "(nothing queued may be lost): restart the proxy to change it")
        fresh = [(lst, key, address) for lst, key, address in zip(listeners, keys, addresses)
                 if key not in self._sockets and key not in self._retired
                 and key not in self._inherited]
        # Probe every new address before binding any: a listener of this very
        # config (0.0.0.0:P beside 127.0.0.1:P) must not look like another process.
        for listener, _, address in fresh:
            if listener.bind.path:
                claim_unix_path(listener.bind)
            elif listener.bind.port and not listener.reuse_port \
                    and not self._overlaps_ours(address):
                check_not_in_use(listener.bind, address, listener.v6only)
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
                    sock = bind_listener(listener.bind, address, v6only=listener.v6only,
                                         mode=listener.mode, owner=self.owner)
                    self._sockets[key] = sock
                    opened.append(key)
                    if listener.bind.path:
                        self._files[id(sock)] = (listener.bind.path,
                                                 _file_id(listener.bind.path))
        except BindError:
            for key in opened:
                sock = self._sockets.pop(key)
                self._unlink(sock)
                sock.close()
            for key in revived:
                sock = self._retired[key] = self._sockets.pop(key)
                stop_new_handshakes(sock)
            for key in adopted:  # never closed here: another master may serve them
                self._inherited[key] = self._sockets.pop(key)
            raise
        for key in adopted:
            if key[0] == socket.AF_UNIX:  # the file the other master bound: ours now too
                path = str(key[1])
                self._files[id(self._sockets[key])] = (path, _file_id(path))
        for listener in listeners:
            if listener.bind.path:
                self._apply_mode(listener)
        return [self._sockets[key] for key in keys]

    def _apply_mode(self, listener: ListenerConfig) -> None:
        """A kept (or adopted) unix socket takes the ``mode`` of the config now served."""
        path = listener.bind.path
        try:
            if stat.S_IMODE(os.stat(path).st_mode) != listener.mode:
                os.chmod(path, listener.mode)
                log.info("listener %s: file mode now %04o", listener.bind, listener.mode)
        except OSError as exc:  # gone, or not ours to change: the old mode stays, said so
            log.warning("listener %s: cannot set its file mode %04o: %s", listener.bind,
                        listener.mode, exc.strerror)

    def _unlink(self, sock: socket.socket) -> None:
        """Remove a unix socket's file if it is still the one it was bound to."""
        path, file_id = self._files.pop(id(sock), ("", None))
        if path and file_id is not None and _file_id(path) == file_id:
            _unlink_quietly(path)

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
            if sock.family == socket.AF_UNIX:
                # No new client can find it; the queued ones are served by the
                # old workers.  A reload adding the path back binds afresh.
                self._unlink(sock)
                key = ("unlinked", sock.fileno()) + key
            else:
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
        """Freeze every queue (graceful stop): the workers' last accept sweep empties them.
        A unix socket's file is removed instead (a filter does not stop unix connects)."""
        for sock in self._sockets.values():
            if sock.family == socket.AF_UNIX:
                self._unlink(sock)
            else:
                stop_new_handshakes(sock)

    def close(self, unlink: bool = True) -> None:
        """Close this master's descriptors.  Another master that holds the same
        sockets (an upgrade) keeps them, and their queues, open; ``unlink``
        False (it does) also leaves their unix socket files in place."""
        self.close_retired()
        self.close_unadopted()
        for sock in self._sockets.values():
            if unlink:
                self._unlink(sock)
            sock.close()
        self._sockets.clear()
        self._files.clear()
