"""Runtime backend control: ``prefork-proxy backend ... drain|disable|enable`` and ``list``.

Who owns what:

- ``ControlServer`` runs in the master, on its loop (no thread: the master
  stays single-threaded so that forking is safe).  It owns a Unix stream
  socket beside the pidfile (``socket_path``), created after the privilege
  drop by the serving user, mode 0600.  The master adds ``fds()`` to its
  ``select`` and calls ``serve`` each turn; nothing in it blocks: accepts
  and reads are non-blocking, at most ``MAX_CLIENTS`` connections are open at
  once, a request is one line of at most ``MAX_REQUEST`` bytes that must
  arrive within ``REQUEST_TIMEOUT_S``, and the reply is one short line.
- What the states mean: ``drain`` takes the backend out of rotation (no new
  connection; open ones run until they end) until ``enable``, or until
  health checks see it go down and come back up (drained, restarted, back:
  the health-check process ends the drain); ``disable`` takes it out until
  ``enable``, whatever checks say.  Either way it is never tried, not even as
  the last resort when every other backend is down.
- ``apply`` (master) turns a request into a change of
  ``BackendTable.admin_state`` (shared memory), which every worker's
  balancer reads on its next pick (the write bumps ``health_version``); so
  the state holds across worker respawns, and ``SharedState.reconfigure``
  keeps it for backends that survive a reload.
- ``request`` runs in the short-lived CLI process: connect, send, read.

Security model: state-changing commands never travel over the HTTP admin
port (that one is read-only).  Whoever can connect to the socket can drain
and disable backends; the file system decides who that is: the socket is
mode 0600 and owned by the user the proxy serves as, in the pidfile's
directory (the runtime directory ``prepare_runtime_dir`` gives that user), so
only that user and root can use it.  The server also checks the peer's
credentials (``SO_PEERCRED``): uid 0 or the master's own uid, nothing else,
even if the socket's mode were loosened.

Protocol: one JSON object per line each way.  Requests are
``{"command": "list"}`` and
``{"command": "set", "listener": L, "backend": B, "action": A}`` with A one
of ``ACTIONS``.  Replies are ``{"ok": true, "backends": [...]}`` or
``{"ok": false, "error": "...", "usage": bool}`` (``usage``: the request
named something that does not exist: the CLI exits 2).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from prefork_proxy import hygiene
from prefork_proxy.errors import ProxyError
from prefork_proxy.shared import ADMIN_STATE_NAMES, ADMIN_STATES, SharedState

log = logging.getLogger("prefork_proxy.backend_control")

#: The command's action -> the state it sets.
ACTIONS = {"drain": ADMIN_STATES["drain"], "disable": ADMIN_STATES["disabled"],
           "enable": ADMIN_STATES["ready"]}
MAX_REQUEST = 4096
MAX_CLIENTS = 16
REQUEST_TIMEOUT_S = 2.0
#: The CLI's wait for the master's reply (the master answers on its next turn).
CLIENT_TIMEOUT_S = 5.0


def socket_path(pidfile: str) -> str:
    """The control socket beside the pidfile (its directory is the runtime directory)."""
    return pidfile + ".sock"


class RequestError(Exception):
    """A request that names a listener or backend that does not exist, or no action."""


def backend_list(shared: SharedState) -> List[Dict[str, Any]]:
    """Every configured backend of every listener with its admin state (master)."""
    table = shared.table
    return [{"listener": listener.label, "route": listener.route_name,
             "backend": str(entry.backend.address),
             "state": "/".join(sorted({ADMIN_STATE_NAMES.get(table.admin_state[slot], "?")
                                       for slot in entry.slots})),  # a name's addresses
             "active": sum(shared.rows.active_count(slot) for slot in entry.slots)}
            for _, listener, entries in shared.pools() for entry in entries]


def apply(shared: SharedState, request: Dict[str, Any]) -> Dict[str, Any]:
    """Carry out one request (master); raises ``RequestError`` for a bad one."""
    command = request.get("command")
    if command == "list":
        return {"ok": True, "backends": backend_list(shared)}
    if command != "set":
        raise RequestError(f"unknown command {command!r}: expected list or set")
    action = request.get("action")
    if action not in ACTIONS:
        raise RequestError(f"unknown action {action!r}: expected one of "
                           f"{', '.join(ACTIONS)}")
    listener_name, backend_name = str(request.get("listener")), str(request.get("backend"))
    route_name = str(request.get("route") or "")  # "": the listener's own pool
    pools = shared.pools()
    of_listener = [(listener, entries) for _, listener, entries in pools
                   if listener_name in (listener.label, str(listener.bind))]
    if not of_listener:
        known = ", ".join(sorted({listener.label for _, listener, _ in pools}))
        raise RequestError(f"no listener {listener_name!r} (listeners: {known})")
    matching = [(pool, entries) for pool, entries in of_listener
                if pool.route_name == route_name]
    if not matching:
        known = ", ".join(pool.route_name for pool, _ in of_listener if pool.route_name)
        raise RequestError(f"listener {of_listener[0][0].label!r} has no route "
                           f"{route_name!r} (routes: {known or 'none'})")
    listener, entries = matching[0]
    chosen = [entry for entry in entries if str(entry.backend.address) == backend_name]
    if not chosen:
        known = ", ".join(str(entry.backend.address) for entry in entries)
        where = f" route {route_name!r}" if route_name else ""
        raise RequestError(f"listener {listener.label!r}{where} has no backend "
                           f"{backend_name!r} (backends: {known or 'none'})")
    state = ACTIONS[action]
    for entry in chosen:  # the same address listed twice: both
        for slot in entry.slots:  # a hostname's every address
            shared.table.admin_state[slot] = state  # bumps health_version
    log.warning("backend %s of listener %s%s: %s (now %s) by the control socket",
                backend_name, listener.label, f" route {route_name}" if route_name else "",
                action, ADMIN_STATE_NAMES[state])
    return {"ok": True, "backends": backend_list(shared)}


class _Client:
    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.data, self.deadline = sock, b"", deadline


class ControlServer:
    """The master's end of the control socket (see the module docstring)."""

    def __init__(self, path: str, handler: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
        self.path = path
        self.handler = handler
        self.uid = os.getuid()
        self.clients: Dict[int, _Client] = {}
        try:
            os.unlink(path)  # a stale socket of a dead master: the pidfile lock says it is
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # born 0600: no window with a wider mode
            try:
                listener.bind(path)
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o600)
            # The file this master created: after an in-place upgrade the new master
            # binds a file of its own at the same path, which this one must not remove.
            made = os.stat(path)
            self._file_id: Tuple[int, int] = (made.st_dev, made.st_ino)
            listener.listen(MAX_CLIENTS)
            listener.setblocking(False)
            hygiene.master_only(listener.fileno())  # no worker keeps it open
        except BaseException:
            listener.close()
            raise
        self.listener: Optional[socket.socket] = listener

    def fds(self) -> List[int]:
        """What the master's ``select`` waits on besides its signals."""
        if self.listener is None:
            return []
        return [self.listener.fileno(), *self.clients]

    def timeout(self, now: float) -> float:
        """How long the master may sleep before a client's deadline passes."""
        return min((c.deadline - now for c in self.clients.values()), default=60.0)

    def serve(self, now: float) -> None:
        """Accept what waits, answer complete requests, drop overdue clients.  Never blocks."""
        if self.listener is None:
            return
        while len(self.clients) < MAX_CLIENTS:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE and the like: try again next turn
                log.warning("control socket: cannot accept: %s", exc)
                break
            sock.setblocking(False)
            hygiene.master_only(sock.fileno())
            if not self._peer_allowed(sock):
                self._reply(sock, {"ok": False, "error": "permission denied", "usage": False})
                continue
            self.clients[sock.fileno()] = _Client(sock, now + REQUEST_TIMEOUT_S)
        for fd, client in list(self.clients.items()):
            self._read(fd, client, now)

    def _peer_allowed(self, sock: socket.socket) -> bool:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except OSError:
            return False
        _, uid, _ = struct.unpack("3i", creds)
        return uid in (0, self.uid)

    def _read(self, fd: int, client: _Client, now: float) -> None:
        try:
            chunk = client.sock.recv(MAX_REQUEST + 1 - len(client.data))
        except (BlockingIOError, InterruptedError):
            if now >= client.deadline:
                self._drop(fd)
            return
        except OSError:
            self._drop(fd)
            return
        client.data += chunk
        if b"\n" not in client.data:
            if not chunk or len(client.data) > MAX_REQUEST or now >= client.deadline:
                self._drop(fd)  # closed early, too long, or too slow: no answer owed
            return
        line = client.data.split(b"\n", 1)[0]
        del self.clients[fd]
        self._reply(client.sock, self._answer(line))

    def _answer(self, line: bytes) -> Dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}", "usage": True}
        try:
            return self.handler(request)
        except RequestError as exc:
            return {"ok": False, "error": str(exc), "usage": True}
        except Exception as exc:  # a bug answers an error; the master goes on
            log.exception("control socket: unexpected error")
            return {"ok": False, "error": f"unexpected error: {exc!r}", "usage": False}

    @staticmethod
    def _reply(sock: socket.socket, reply: Dict[str, Any]) -> None:
        try:  # a short line: the socket buffer takes it whole
            sock.send(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            hygiene.forget(sock.fileno())
            sock.close()

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        hygiene.forget(fd)
        client.sock.close()

    def close(self, unlink: bool = True) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        if self.listener is not None:
            hygiene.forget(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if unlink:
                try:
                    now = os.stat(self.path)
                    if (now.st_dev, now.st_ino) == self._file_id:
                        os.unlink(self.path)
                except OSError:
                    pass


def request(pidfile: str, message: Dict[str, Any],
            timeout_s: float = CLIENT_TIMEOUT_S) -> Dict[str, Any]:
    """CLI: send one request to the master behind ``pidfile``; its reply.

    ``ProxyError`` when there is no master to ask or it does not answer.
    """
    path = socket_path(pidfile)
    deadline = time.monotonic() + timeout_s
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while b"\n" not in data and len(data) < (1 << 20):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ProxyError(f"{path}: no control socket (is the master behind {pidfile} "
                         "running?)") from None
    except PermissionError:
        raise ProxyError(f"{path}: permission denied: run as the user the proxy serves as "
                         "(or root)") from None
    except socket.timeout:
        raise ProxyError(f"{path}: the master did not answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise ProxyError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        raise ProxyError(f"{path}: the master's reply is not understood") from None
    if not isinstance(reply, dict):
        raise ProxyError(f"{path}: the master's reply is not understood")
    return reply


def render(rows: List[Dict[str, Any]]) -> str:
    """``backend list`` as text."""
    lines = [f"{'listener':<22} {'backend':<34} {'state':<9} {'active':>6}"]
    lines += [f"{_pool(row):<22} {row['backend']:<34} {row['state']:<9} {row['active']:>6}"
              for row in rows]
    return "\n".join(lines)


def _pool(row: Dict[str, Any]) -> str:
    """A row's pool as ``backend list`` shows it: the listener, and its route if any."""
    return row["listener"] + (f" route {row['route']}" if row.get("route") else "")
