"""systemd's readiness protocol (``sd_notify``), written here so there is no dependency.

Called by the master only, never by a worker: with ``NotifyAccess=main``
systemd accepts messages from the main PID alone, and the master is the one
process that knows when the whole proxy serves.  The master sends:

- ``READY=1`` (``ready()``) once, right after it logs its first ``ready`` line:
  every listener is bound and the first workers are forked.  With
  ``Type=notify``, ``systemctl start`` returns only then, so units ordered
  ``After=prefork-proxy.service`` start against a proxy that accepts.
- ``RELOADING=1`` (``reloading()``) when SIGHUP arrives, then ``READY=1`` again
  when the new generation of workers serves (or the reload failed and the old
  generation goes on serving: the service is ready either way).
- ``STOPPING=1`` (``stopping()``) when SIGTERM starts the graceful drain, so
  ``systemctl status`` says "deactivating" instead of "active" meanwhile.
- ``STATUS=...`` (``status()``) whenever a one-line summary is worth showing
  in ``systemctl status``.

Where ``$NOTIFY_SOCKET`` is unset (not started by systemd: a terminal, Docker,
Kubernetes, the tests) every call returns False and does nothing.  A broken or
missing socket is logged at debug level and never raises: telling systemd is a
courtesy, and no failure of it may take the proxy down.

The protocol (``man sd_notify``): one datagram of ``KEY=VALUE`` lines, sent to
the ``AF_UNIX`` ``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET``; a name that
starts with ``@`` is in the abstract namespace (the ``@`` stands for a NUL
byte).  ``vsock:`` addresses (systemd 253+, for virtual machines) are not
supported and count as "no socket".
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import List

log = logging.getLogger("prefork_proxy.notify")

#: The environment variable systemd sets for ``Type=notify`` services.
NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
#: A datagram to a full queue blocks; the master's loop must not hang on systemd.
SEND_TIMEOUT_S = 2.0


def _address() -> str:
    """The socket address from ``$NOTIFY_SOCKET``, "" when unset or unsupported."""
    name = os.environ.get(NOTIFY_SOCKET_ENV, "")
    if name.startswith("@"):
        return "\0" + name[1:]  # abstract namespace: the kernel wants a leading NUL
    if name.startswith("/"):
        return name
    if name:
        log.debug("%s=%r is not a Unix socket path; not notifying", NOTIFY_SOCKET_ENV, name)
    return ""


def notify(message: str) -> bool:
    """Send ``message`` (newline-separated ``KEY=VALUE`` lines) as one datagram.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is
    unset (nothing is done) or sending failed (logged at debug, never raised).
    """
    address = _address()
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:  # ENOENT, ECONNREFUSED, EACCES, EPROTOTYPE, timeout, ...
        log.debug("cannot notify %s %r: %s", NOTIFY_SOCKET_ENV, address.replace("\0", "@"), exc)
        return False
    return True


def _one_line(text: str) -> str:
    """A value on one line: a newline would start a new ``KEY=VALUE`` assignment."""
    return " ".join(text.splitlines())


def _with_status(lines: List[str], text: str) -> str:
    if text:
        lines.append("STATUS=" + _one_line(text))
    return "\n".join(lines)


def ready(status: str = "") -> bool:
    """``READY=1``: the proxy serves (first start, or the end of a reload)."""
    return notify(_with_status(["READY=1"], status))


def reloading(status: str = "") -> bool:
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` that systemd 253+ expects beside it.

    systemd compares that timestamp with when it asked for the reload, to tell
    this reload from an older one; it must be ``CLOCK_MONOTONIC`` in microseconds.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(_with_status(["RELOADING=1", f"MONOTONIC_USEC={usec}"], status))


def stopping(status: str = "") -> bool:
    """``STOPPING=1``: a graceful stop (the drain) has begun."""
    return notify(_with_status(["STOPPING=1"], status))


def status(text: str) -> bool:
    """``STATUS=text``: a free-form line shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text))


__all__: List[str] = ["notify", "ready", "reloading", "stopping", "status", "NOTIFY_SOCKET_ENV"]
