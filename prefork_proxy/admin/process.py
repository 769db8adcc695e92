"""The admin process (``prefork-proxy: admin``) and the master's handle on it.

Master side, ``AdminEndpoint`` (called from the master's loop only; no thread,
no blocking but the bounded ``stop``):

- ``open`` binds the admin socket before anything is forked, and the master
  keeps it for life: a restart of the admin process loses nothing (clients
  wait in the backlog), and privileged ports work before privileges drop;
- ``start`` forks the admin process; ``tick`` restarts it ``RESTART_DELAY_S``
  after it died (``reaped`` is told by the master's reap loop), doubling the
  delay up to ``MAX_RESTART_DELAY_S`` while it keeps dying young; ``stop`` ends
  it at the master's exit, after the workers, so ``/live`` answers until then;
- ``beat``/``set_stopping``/``publish`` write the shared ``StatusPage``.

Workers never hold the admin port: ``hygiene.detach_from_master`` in every
child closes each inherited listening socket that is not its own.

Admin process side (``_child``): fork hygiene (``hygiene.detach_from_master``
keeping only the admin socket, then its own signal handlers), then one
``AdminServer`` thread serving ``endpoints.build_routes``, while the main
thread waits for SIGTERM or its master's death.  It never touches a relay
thread (those live in the workers) and writes no shared memory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Dict, Iterable, Optional

from prefork_proxy import children, hygiene
from prefork_proxy.admin.page import StatusPage
from prefork_proxy.admin.server import is_loopback
from prefork_proxy.config import Endpoint
from prefork_proxy.errors import BindError
from prefork_proxy.proctitle import set_title
from prefork_proxy.rows import WorkerRows

log = logging.getLogger("prefork_proxy.admin")

#: Wait before restarting an admin process that died (it should not die).
RESTART_DELAY_S = 0.5
#: One that dies younger than this counts toward a crash loop (the delay doubles).
MIN_HEALTHY_LIFETIME_S = 5.0
MAX_RESTART_DELAY_S = 30.0
#: How long ``stop`` waits for SIGTERM to work before SIGKILL.
STOP_GRACE_S = 1.0
#: The admin process's main thread checks on its master this often.
PARENT_POLL_S = 0.5
BACKLOG = 128
_CHILD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


def bind_admin(endpoint: Endpoint) -> socket.socket:
    """Bind and listen on ``endpoint`` (no SO_REUSEPORT: one owner of the admin port)."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind the admin endpoint {endpoint}: cannot resolve host: "
                        f"{exc.strerror}") from None
    family, _, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        reason = {errno.EADDRINUSE: "address already in use",
                  errno.EACCES: "permission denied",
                  errno.EADDRNOTAVAIL: "address not available on this machine"}.get(
            exc.errno, exc.strerror or str(exc))
        raise BindError(f"cannot bind the admin endpoint {endpoint}: {reason}") from None
    return sock


def _serves(sock: socket.socket, endpoint: Endpoint) -> bool:
    """Whether ``sock`` listens where ``endpoint`` says (any port for port 0)."""
    try:
        host, port = sock.getsockname()[:2]
        infos = socket.getaddrinfo(endpoint.host, endpoint.port or None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    wanted = infos[0][4]
    return wanted[0] == host and (not endpoint.port or wanted[1] == port)


def _address_text(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AdminEndpoint:
    """The master's handle: the admin socket, the shared page, the admin process's pid."""

    def __init__(self, sock: socket.socket, configured: Endpoint) -> None:
        self.sock = sock
        self.configured = configured
        self.address = _address_text(sock)
        self.page = StatusPage()
        self.pid = 0
        self._restart_at = 0.0
        self._started_at = 0.0
        self._fast_deaths = 0
        self._warned_bind: Optional[Endpoint] = None

    @classmethod
    def open(cls, endpoint: Endpoint,
             inherited: Optional[socket.socket] = None) -> "AdminEndpoint":
        """Bind (master, before any fork); warns once if other hosts can reach it.

        ``inherited``: the admin socket of the master this one upgrades
        (``handover``), used instead of binding when it listens on ``endpoint``.
        """
        sock = inherited if inherited is not None and _serves(inherited, endpoint) \
            else bind_admin(endpoint)
        if inherited is not None and sock is not inherited:
            inherited.close()  # the config moved the endpoint: the old address is not ours
        # Imported now, before privileges drop: the admin process imports nothing
        # later from an installation the serving user may not be able to read.
        import prefork_proxy.admin.endpoints  # noqa: F401
        admin = cls(sock, endpoint)
        if not is_loopback(sock.getsockname()):
            log.warning("admin endpoint bound to %s, which is not a loopback address: anyone "
                        "who can reach it can read status and metrics (it changes nothing)",
                        admin.address)
        log.info("admin endpoint listening on %s (/live /ready /status /metrics)",
                 admin.address)
        return admin

    # -- the shared page

    def beat(self, now: float) -> None:
        self.page.beat(now)

    def set_stopping(self) -> None:
        self.page.set_stopping()

    def publish(self, status: Dict[str, Any]) -> None:
        if not self.page.publish(json.dumps(status).encode()):
            log.warning("status model too large for the admin page (%d bytes); /status shows "
                        "the previous one", self.page.capacity)

    # -- the process

    def tick(self, now: float, board: WorkerRows, configured: Optional[Endpoint]) -> None:
        """(Re)start the admin process when due; warn once if a reload changed [admin]."""
        if configured != self.configured and configured != self._warned_bind:
            self._warned_bind = configured
            log.warning("[admin] bind changed to %s by a reload: the admin endpoint keeps %s "
                        "until the next start", configured or "off", self.address)
        if not self.pid and now >= self._restart_at:
            self.start(board)

    def reaped(self, pid: int, now: float) -> bool:
        """The master reaped ``pid``: if it was the admin process, restart it soon."""
        if not pid or pid != self.pid:
            return False
        young = now - self._started_at < MIN_HEALTHY_LIFETIME_S
        self._fast_deaths = self._fast_deaths + 1 if young else 0
        delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, self._fast_deaths - 1))
        log.warning("admin process %d died; restarting it in %.1f s%s", pid, delay,
                    f" ({self._fast_deaths} quick deaths in a row)" if self._fast_deaths > 1
                    else "")
        self.pid = 0
        self._restart_at = now + delay
        return True

    def start(self, board: WorkerRows) -> None:
        master_pid = os.getpid()
        # Blocked across fork (as for workers): a SIGTERM that reached the child
        # before its own handler was installed would run the master's copy and
        # be lost.  The child unblocks once its handlers are in place.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            log.error("cannot fork the admin process: %s; retrying in %.1f s",
                      exc.strerror or exc, RESTART_DELAY_S)
            self._restart_at = time.monotonic() + RESTART_DELAY_S
            return
        if pid == 0:
            code = 1
            try:
                _child(self.sock, self.page, board, master_pid, previous_mask)
                code = 0
            except BaseException:
                log.exception("admin process crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        self.pid = pid
        self._started_at = time.monotonic()
        log.info("admin process started: pid=%d", pid)

    def stop(self) -> None:
        """End the admin process (bounded: SIGTERM, SIGKILL after ``STOP_GRACE_S``)."""
        pid, self.pid = self.pid, 0
        if pid:
            children.stop(pid, STOP_GRACE_S)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the process


def _child(sock: socket.socket, page: StatusPage, board: WorkerRows, master_pid: int,
           signal_mask: Iterable[int]) -> None:
    """The admin process's whole life (its main thread)."""
    from prefork_proxy.admin.endpoints import build_routes  # loaded by open()
    from prefork_proxy.admin.server import AdminServer

    stop = threading.Event()
    # The master's wake-up pipe and proxy listeners go (this process serves none);
    # a master that died before PR_SET_PDEATHSIG took effect is seen by the
    # getppid() check below.
    hygiene.detach_from_master(keep={sock.fileno()},
                               ignore=hygiene.MASTER_SIGNALS + (signal.SIGUSR1,),
                               default=(signal.SIGCHLD,))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, lambda *_: stop.set())
    signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
    set_title("prefork-proxy: admin")
    server = AdminServer(sock, build_routes(page, board, master_pid))
    server.start(warn_exposed=False)  # the master warned once, at bind
    while not stop.is_set() and os.getppid() == master_pid:
        stop.wait(PARENT_POLL_S)
    server.stop()

