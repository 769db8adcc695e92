"""What the pre-connect phase answers, and the status/term/reason table of its refusals.

Owns the three verdicts (``NeedMore``, ``Accept``, ``Reject``) and every code a
refusal can carry.  Pure data: built by ``pipeline.Admission`` on a worker's
relay thread, read by the relay (what to do next) and later by the access log
and metrics (issue 11).

Codes, as issue 11's access log defines them.  ``status`` is nginx stream's
(400 bad client data, 403 forbidden, 500 internal error, 503 over a limit);
``term`` is HAProxy's two characters, first *who/what* ended the connection,
second *in which phase*.  Every refusal here happens in the request phase
(``R``: before a backend was chosen, while the proxy waited for or judged what
the client sent), so the second character is always ``R``:

======  ======  =====  ======================================================
status  term    abort  when
======  ======  =====  ======================================================
400     ``CR``  RST    the client sent bytes that are not a valid PROXY header
                       or TLS ClientHello where one is required, or closed
                       before it was complete (``*_truncated``)
400     ``cR``  FIN    client-side timeout: the header/hello did not arrive
                       within ``proxy_timeout_ms``/``sni_timeout_ms``
403     ``PR``  RST    the proxy refused it by rule: ``deny``/``allow``, no
                       route for its server name and no default pool
503     ``PR``  RST    the proxy refused it by a configured limit
                       (``max_connections``, per source, per source per second)
503     ``RR``  RST    a resource of the proxy ran out: the shared per-source
                       table, the listener's share of it, or this worker's
                       ledger is full
500     ``IR``  RST    an unexpected error in a step (logged with a traceback)
503     ``sQ``  RST    no backend slot: every backend is at its
                       ``max_connections`` and the client waited
                       ``queue_timeout_ms`` in the queue (``queue_timeout``),
                       or it is 0 (``backend_max_connections``), or the
                       queue is full (``queue_full``); HAProxy's 's' (server
                       side) and 'Q' (queue phase).  Told by the relay's
                       connect phase (``backend_queue``), not the pipeline
======  ======  =====  ======================================================

Two terms end a relayed connection, not a refusal (no ``Reject`` carries
them; the relay's idle sweep, ``relay/idle.py``, sets them): the data phase
(``D``) saw no byte either way for ``idle_timeout_ms``, closed with a FIN
both ways; the status is the one of any relayed connection (200):

======  ======  =====  ======================================================
200     ``cD``  FIN    client-side idle timeout: the proxy waited for the
                       client (the server answered last, bytes for the client
                       sit unread, or nothing was ever sent)
200     ``sD``  FIN    server-side idle timeout: the proxy waited for the
                       server (the client spoke last and got no answer, or
                       bytes for the server sit unread)
======  ======  =====  ======================================================

``abort`` says how the relay closes: with ``SO_LINGER {1, 0}`` (an RST, so a
refused client does not wait and the proxy keeps no TIME_WAIT), or with a
plain close (a FIN) for a timeout, where the client was slow, not wrong.  A
client that sent bytes we did not read gets an RST from the kernel anyway;
making it explicit keeps the ending independent of timing.

``reason`` is one of ``REASONS``: a bounded set, safe as the ``reason`` label
of ``prefork_proxy_rejected_connections_total``.  ``detail`` is free text for
the log line only (never a label).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

from prefork_proxy import acl, limits, proxy_protocol

__all__ = ["NeedMore", "Accept", "Reject", "Wait", "Verdict", "REASONS", "TERMS",
           "BAD_REQUEST", "FORBIDDEN", "INTERNAL", "OVER_LIMIT"]

BAD_REQUEST, FORBIDDEN, INTERNAL, OVER_LIMIT = 400, 403, 500, 503

#: term -> (meaning, abort with an RST?)
TERMS = {
    "CR": ("client sent invalid data (or closed) in the request phase", True),
    "cR": ("client-side timeout in the request phase", False),
    "PR": ("refused by the proxy (a rule or a limit) in the request phase", True),
    "RR": ("a proxy resource ran out in the request phase", True),
    "IR": ("internal error in the request phase", True),
    "sQ": ("no backend slot free: refused in the queue phase", True),
    "cD": ("client-side idle timeout in the data phase (idle_timeout_ms)", False),
    "sD": ("server-side idle timeout in the data phase (idle_timeout_ms)", False),
}

#: Reasons of a PROXY header refusal: the parser's own, prefixed.
PROXY_REASONS = frozenset("proxy_" + r for r in proxy_protocol.REASONS)
#: Reasons of a ClientHello refusal: the reader's own, the clock's and the route's.
SNI_REASONS = frozenset({
    "sni_not_tls", "sni_sslv2", "sni_bad_record", "sni_bad_handshake",
    "sni_bad_server_name", "sni_bad_alpn", "sni_too_large", "sni_too_fragmented",
    "sni_timeout", "sni_truncated",
    "sni_no_server_name",  # a valid hello without SNI, and no default pool
    "sni_no_route",        # a server name no route matches, and no default pool
})
ACCESS_REASONS = frozenset({acl.DENIED, acl.NOT_ALLOWED, acl.BAD_ADDRESS})
LIMIT_REASONS = frozenset(limits.REASONS.values())
#: Reasons of a refusal for want of a backend slot (``backend_queue``), term ``QUEUE_TERM``.
QUEUE_TIMEOUT, BACKENDS_FULL, QUEUE_FULL = "queue_timeout", "backend_max_connections", \
    "queue_full"
QUEUE_TERM = "sQ"
QUEUE_REASONS = frozenset({QUEUE_TIMEOUT, BACKENDS_FULL, QUEUE_FULL})
#: Every ``Reject.reason``.
REASONS = PROXY_REASONS | SNI_REASONS | ACCESS_REASONS | LIMIT_REASONS | QUEUE_REASONS | \
    {"internal_error"}

#: ``Accept.client_address``/``destination``: ``(ip, port)`` for TCP, else the socket's
#: own value (a unix path, ``""`` for an unnamed unix peer) or None.
Address = Union[Tuple[str, int], str, bytes, None]


class NeedMore:
    """No verdict yet: read more bytes and ``feed`` them, or ``expire`` at ``deadline``.

    ``deadline`` is a ``time.monotonic()`` value (None: no time limit).  It is
    the same object from one ``feed`` to the next while it does not change;
    the relay re-arms its timer only when ``deadline`` differs from the one
    it armed (it moves when the PROXY header is complete and the ClientHello
    is awaited next; it may then lie in the past: expire at once).
    """

    #: What the relay reads to tell verdicts apart (``relay.admit.verdict_kind``).
    kind = "more"
    __slots__ = ("deadline",)

    def __init__(self, deadline: Optional[float]) -> None:
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"NeedMore(deadline={self.deadline!r})"


class Accept:
    """Connect: to ``route`` (an index into the listener's routes; None: its own backends).

    ``client_address`` is *the* client address (the PROXY header's when one was
    accepted, the socket peer otherwise): what the ACL, limits, ``source_hash``,
    the access log and ``send_proxy`` use; ``destination`` the address the
    client connected to (the header's, else the socket's local one), for
    ``send_proxy``.  ``forward_prefix`` are bytes already read from the client
    that the backend must get first, before anything else is relayed (the
    stream after the PROXY header: the ClientHello and whatever came with it);
    ``consumed`` is how many bytes were read and *not* forwarded (the PROXY
    header).  Bytes read from the client = ``consumed + len(forward_prefix)``.
    ``server_name`` is the SNI name (normalized) when an SNI step read one.

    ``send_first`` is not the pipeline's: the chooser (``gate.PoolChoice``) sets
    it when every backend of the chosen pool wants the same PROXY header (the
    header does not depend on which backend connects), and the relay sends
    it to whichever backend connects, ahead of ``forward_prefix``.  A pool
    whose backends differ gives each ``Target`` its own ``send_prefix`` instead.
    """

    #: What the relay reads to tell verdicts apart (``relay.admit.verdict_kind``).
    kind = "accept"
    __slots__ = ("route", "client_address", "destination", "forward_prefix", "consumed",
                 "server_name", "send_first")

    def __init__(self, route: Optional[int], client_address: Address, destination: Address,
                 forward_prefix: bytes, consumed: int,
                 server_name: Optional[str] = None) -> None:
        self.route = route
        self.client_address = client_address
        self.destination = destination
        self.forward_prefix = forward_prefix
        self.consumed = consumed
        self.server_name = server_name
        self.send_first = b""

    def _key(self) -> tuple:
        return (self.route, self.client_address, self.destination, self.forward_prefix,
                self.consumed, self.server_name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accept) and other._key() == self._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return ("Accept(route={!r}, client_address={!r}, destination={!r}, "
                "forward_prefix={!r}, consumed={!r}, server_name={!r})").format(*self._key())


class Reject:
    """Close the client: ``status``, ``term`` and ``reason`` for the log and metrics.

    ``abort`` (from ``TERMS``): close with an RST.  Nothing was sent to any
    backend, and any limit token was already given back.  ``server_name``: the
    SNI name (normalized) when the refusal came after one was read (no route for
    it), for the access log's ``sni=``.
    """

    #: What the relay reads to tell verdicts apart (``relay.admit.verdict_kind``).
    kind = "reject"
    __slots__ = ("status", "term", "reason", "detail", "abort", "server_name")

    def __init__(self, status: int, term: str, reason: str, detail: str = "",
                 server_name: Optional[str] = None) -> None:
        self.status = status
        self.term = term
        self.reason = reason
        self.detail = detail
        self.abort = TERMS[term][1]
        self.server_name = server_name

    def _key(self) -> tuple:
        return (self.status, self.term, self.reason)

    def __eq__(self, other: object) -> bool:
        # ``detail`` is prose for people; equal verdicts may word it differently.
        return isinstance(other, Reject) and other._key() == self._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Reject({self.status}, {self.term!r}, {self.reason!r}"
                f"{', ' + repr(self.detail) if self.detail else ''})")


class Wait:
    """No verdict yet: wait (reading nothing) for a slot in ``queue``, then ``retry``.

    Given by the limits step when the listener's ``max_connections`` was
    reached by a race between workers (the accept loop saw a free slot): the
    client waits for one as it would have in the kernel's queue.  ``queue`` is
    opaque here (a ``backend_queue.BackendQueue`` the gate gave the step); the
    relay joins it, and refuses with ``queue.timed_out`` at its deadline.
    """

    #: What the relay reads to tell verdicts apart (``relay.admit.verdict_kind``).
    kind = "wait"
    __slots__ = ("queue",)

    def __init__(self, queue: object) -> None:
        self.queue = queue

    def __repr__(self) -> str:
        return f"Wait({self.queue!r})"


Verdict = Union[NeedMore, Accept, Reject, Wait]
