"""The steps of the pre-connect phase: PROXY header, access rules, limits, SNI routing.

Who owns what.  A step is compiled once per listener and config (by
``pipeline.compile_pipeline``, in each worker at boot) and is immutable:
every relay thread of a worker shares it without a lock.  All the
per-connection state lives on the ``pipeline.Admission`` the step is handed;
a step reads and writes that state and answers, on the relay thread, without
ever blocking (no system call here beyond the limits' record lock, held for a
few microseconds):

- ``enter(adm)``: the step's turn has come (the steps before it are done).
  ``None``: done, go on; a ``Reject``: refuse; an ``int`` n > 0: wait for at
  least n more bytes (only steps with ``reads = True``).
- ``take(adm)`` (reading steps): more bytes are in ``adm.buffer``; same answers.
- ``timed_out(adm)`` / ``truncated(adm)`` (reading steps): the refusal for a
  deadline passed, or for the client closing, while the step waited.

Each step does one thing and leans on the module that owns the rule:
``proxy_protocol.parse``, ``acl.Acl.check``, ``limits.ConnectionLimits`` and
``client_hello.read_client_hello`` + ``sni_routes.ServerNameTable``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from prefork_proxy import acl as acl_module
from prefork_proxy import limits as limits_module
from prefork_proxy.client_hello import ClientHello, ClientHelloError, read_client_hello
from prefork_proxy.proxy_protocol import ProxyHeader, ProxyHeaderError, parse
from prefork_proxy.sni_routes import ServerNameTable

from .verdicts import BAD_REQUEST, FORBIDDEN, OVER_LIMIT, Reject, Wait

if TYPE_CHECKING:
    from .pipeline import Admission

#: What ``enter``/``take`` return: done, refused, or "at least this many more bytes".
StepResult = Union[None, Reject, Wait, int]

#: The longest v2 ``len`` a listener accepts (the parser's own bound is 65,535): a
#: header is buffered whole, so this bounds a trusted peer's memory per connection.
#: Real headers are 16-230 bytes plus TLVs (AWS, Azure, GCP send well under 1 KiB).
PROXY_V2_MAX_LENGTH = 4096


def client_ip(address: object) -> Optional[str]:
    """The IP of an address as sockets give it (``(ip, port, ...)``), None for unix ones."""
    if isinstance(address, tuple):
        return address[0]
    return None


class ProxyHeaderStep:
    """``accept_proxy``: a PROXY header (v1, v2 or either) from trusted peers.

    A peer outside ``trusted`` (an ``acl.Acl`` whose ``allow`` is
    ``trusted_proxies``; None: every peer is trusted) skips this step: it is
    served as a direct client, and its bytes, PROXY-looking or not, are the
    stream.  From a trusted peer the header is required; once complete it
    replaces the client address (unless LOCAL/UNKNOWN/UNSPEC/UNIX: then the
    real endpoints stay), its bytes are consumed and what follows is the stream.
    A unix-socket peer has no IP: trusted only when ``trusted`` is None.

    The parser is called on every ``take`` (not only once a length hint is
    met): it costs a few µs on at most 107 bytes (v1) or the 16-byte fixed
    part (v2), and a bad first byte is refused at once instead of at the deadline.
    """

    reads = True
    __slots__ = ("version", "trusted", "timeout_s", "max_v2_length")

    def __init__(self, version: str = "any", trusted: Optional[acl_module.Acl] = None,
                 timeout_ms: int = 3000, max_v2_length: int = PROXY_V2_MAX_LENGTH) -> None:
        if version not in ("v1", "v2", "any"):
            raise ValueError(f"accept_proxy must be 'v1', 'v2' or 'any', not {version!r}")
        self.version = version
        self.trusted = trusted
        self.timeout_s = timeout_ms / 1000.0 if timeout_ms else None
        self.max_v2_length = max_v2_length

    def enter(self, adm: "Admission") -> StepResult:
        if self.trusted is not None:
            ip = client_ip(adm.peer)
            if ip is None or not self.trusted.admits(ip):
                return None
        adm.deadline = None if self.timeout_s is None else adm.accepted_at + self.timeout_s
        return self.take(adm) if adm.buffer else 1

    def take(self, adm: "Admission") -> StepResult:
        try:
            header = parse(adm.buffer, self.version, self.max_v2_length)
        except ProxyHeaderError as exc:
            return Reject(BAD_REQUEST, "CR", "proxy_" + exc.reason, str(exc))
        if not isinstance(header, ProxyHeader):
            return 1
        adm.proxy_header = header
        adm.consumed += header.length
        del adm.buffer[:header.length]
        client = header.client
        if client is not None:
            adm.client_address = client
            adm.destination = header.destination
        return None

    def timed_out(self, adm: "Admission") -> Reject:
        return Reject(BAD_REQUEST, "cR", "proxy_timeout",
                      f"no complete PROXY header in {self.timeout_s} s")

    def truncated(self, adm: "Admission") -> Reject:
        return Reject(BAD_REQUEST, "CR", "proxy_truncated",
                      f"client closed after {len(adm.buffer)} bytes of a PROXY header")


class AccessStep:
    """``allow``/``deny`` on the client address: refused with 403 and an RST.

    A client without an IP (a unix-socket peer) is refused (``bad_address``):
    an access rule fails closed.
    """

    reads = False
    __slots__ = ("acl",)

    def __init__(self, acl: acl_module.Acl) -> None:
        self.acl = acl

    def enter(self, adm: "Admission") -> StepResult:
        reason = self.acl.check(client_ip(adm.client_address) or "")
        if reason is None:
            return None
        return Reject(FORBIDDEN, "PR", reason, f"client {adm.client_address!r}")


class SourceLimitStep:
    """``max_connections`` (the listener, all workers) and the per-source limits.

    One ``ConnectionLimits.acquire`` for all three (one lock, exact across
    workers).  The token is kept on the admission, which gives it back exactly
    once: at once when the connection is refused later in the pipeline, else
    when the relay calls ``Admission.release`` at close.  A client without an
    IP (unix socket) counts toward the listener limit only.
    """

    reads = False
    __slots__ = ("limits", "scope", "max_connections", "max_per_source", "max_new_per_second",
                 "queue")

    def __init__(self, limits: limits_module.ConnectionLimits, scope: int,
                 max_connections: int = 0, max_per_source: int = 0,
                 max_new_per_second: int = 0, queue: Optional[object] = None) -> None:
        self.limits = limits
        # Where a client that lost the race for the listener's last slot waits
        # (``Wait``; the accept loop stops accepting at the limit, so only a race
        # between workers gets here); None: refused.
        self.queue = queue
        self.scope = scope
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.max_new_per_second = max_new_per_second

    def enter(self, adm: "Admission") -> StepResult:
        ip = client_ip(adm.client_address)
        if ip is None:
            token = self.limits.acquire(self.scope, "", self.max_connections)
        else:
            token = self.limits.acquire(self.scope, ip, self.max_connections,
                                        self.max_per_source, self.max_new_per_second)
        if token >= 0:
            adm.token = token
            adm.limits = self.limits
            return None
        if token == limits_module.REFUSED_LISTENER and self.queue is not None:
            return Wait(self.queue)
        term = "RR" if token in (limits_module.REFUSED_TABLE_FULL,
                                 limits_module.REFUSED_LEDGER_FULL,
                                 limits_module.REFUSED_SHARE) else "PR"
        return Reject(OVER_LIMIT, term, limits_module.REASONS[token],
                      f"client {adm.client_address!r}")


class SniStep:
    """Route by the TLS server name (and ALPN) of the ClientHello, without terminating TLS.

    Every byte read is forwarded (``Accept.forward_prefix``), the hello
    included.  ``table`` maps names to route indices; ``has_default``: the
    listener has backends of its own for clients no route takes.  Outcomes:

    - a route matches: ``Accept(route=i)``;
    - no SNI, or no route matches: the default pool (``route=None``), else 403
      ``sni_no_server_name`` / ``sni_no_route`` (the ``Reject`` carries the name);
    - not TLS, or a malformed hello (``client_hello`` refuses it): 400
      ``sni_<reader's reason>``, default pool or not (issue 13: a plain-text client
      of an SNI listener is refused; nginx ``ssl_preread`` would pass it on with an
      empty name, which would hand non-TLS bytes to a TLS backend);
    - the hello not complete at ``sni_timeout_ms`` after accept (400, ``cR``)
      or the client closing first (400, ``CR``), default pool or not.

    The reader is called again only once its ``at_least`` hint has arrived
    (a trickling client costs one parse per hint, not per byte); at the end
    (deadline or close) the bytes not parsed yet are parsed once, so the
    answer never depends on how the bytes were split.
    """

    reads = True
    __slots__ = ("table", "has_default", "timeout_s")

    def __init__(self, table: Optional[ServerNameTable], has_default: bool,
                 timeout_ms: int = 3000) -> None:
        self.table = table
        self.has_default = has_default
        self.timeout_s = timeout_ms / 1000.0 if timeout_ms else None

    def enter(self, adm: "Admission") -> StepResult:
        adm.deadline = None if self.timeout_s is None else adm.accepted_at + self.timeout_s
        return self.take(adm) if adm.buffer else 1

    def take(self, adm: "Admission") -> StepResult:
        try:
            hello = read_client_hello(adm.buffer)
        except ClientHelloError as exc:
            adm.sni_error = exc.reason
            return Reject(BAD_REQUEST, "CR", "sni_" + exc.reason, exc.detail)
        if not isinstance(hello, ClientHello):
            return hello.at_least
        name = hello.server_name_normalized
        route = None
        if name is not None and self.table is not None:
            route = self.table.lookup(name, hello.alpn)
        adm.server_name = name
        if route is None and not self.has_default:
            if name is None:
                return Reject(FORBIDDEN, "PR", "sni_no_server_name",
                              "a ClientHello without SNI and no default backends")
            return Reject(FORBIDDEN, "PR", "sni_no_route",
                          f"no route for {name!r} and no default backends", server_name=name)
        adm.route = route
        return None

    def timed_out(self, adm: "Admission") -> Reject:
        return Reject(BAD_REQUEST, "cR", "sni_timeout",
                      f"no complete ClientHello in {self.timeout_s} s")

    def truncated(self, adm: "Admission") -> Reject:
        return Reject(BAD_REQUEST, "CR", "sni_truncated",
                      f"client closed after {len(adm.buffer)} bytes of a ClientHello")


Step = Union[ProxyHeaderStep, AccessStep, SourceLimitStep, SniStep]
