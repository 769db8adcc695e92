"""The configuration: TOML text -> frozen dataclasses, with every check in one place.

Owned by the master, which loads it at start and on every reload; workers get
the resulting ``Config`` object through ``fork`` and never parse anything.
``prefork-proxy check`` calls ``load_file`` without binding anything.

The file speaks the seed's language (README's "Configuration" has the full example)::

    [server]                 # optional
    workers = 8

    [[tcp_proxy]]            # one listener per section
    bind = "0.0.0.0:5432"
    backends = ["db-primary:5432", { address = "db-dr:5432", backup = true }]

    [admin]                  # optional: the HTTP admin endpoint (off unless configured)
    bind = "127.0.0.1:9901"

    [tcp_proxy.health_check] # optional sub-table (or inline: health_check = { ... })
    interval_ms = 2000

Every key is declared once, below the dataclasses (``SERVER``, ``LISTENER``,
``HEALTH_CHECK``, ``KEEPALIVE``, ``BACKEND``, ``ADMIN``, gathered in ``SECTIONS``): its
kind and range drive validation and messages, the dataclass field its default,
and ``scripts/config_table.py`` turns the declarations into README's table of
every key.  Checks across keys are the plain functions after them.  The
generic machinery (kinds, tables, line lookup) is ``schema``.

Principle: every error is a ``ConfigError`` whose message names the file, the
line (found by scanning the raw text, since ``tomllib`` only reports lines for
syntax errors), the section (``tcp_proxy[1]`` counts from 1 and shows the
section's bind), the key, and what was expected.  Unknown keys are errors, so a
typo never silently falls back to a default.  Numbers are finite and within
their documented range (``nan``, ``inf`` and booleans are refused everywhere);
hostnames are valid DNS names and IP literals are usable as written (a scope
id names an existing interface), so nothing that passes validation can make
the master or the resolver fail on it later.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple

from prefork_proxy import acl
from prefork_proxy.errors import ConfigError
from prefork_proxy.schema import (
    Array,
    Auto,
    Flag,
    Int,
    Invalid,
    Key,
    Kind,
    OneOf,
    Row,
    Seconds,
    Source,
    Table,
    Text,
    Where,
    describe,
    rows,
)
from prefork_proxy.sni_routes import ServerNameTable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on old Pythons
    import tomli as tomllib

RELAY_MODES = ("auto", "splice", "copy")
DEFAULT_CONNECT_TIMEOUT_MS = 5000
DEFAULT_DRAIN_TIMEOUT_S = 30.0
DEFAULT_WORKER_TIMEOUT_S = 30.0
#: Per worker, MiB held in user-space buffers and pipes for destinations slower
#: than their sources; when spent, streams stop reading (backpressure) until it frees.
DEFAULT_BUFFER_BUDGET_MB = 64
MAX_BUFFER_BUDGET_MB = 65_536
#: TCP keepalive limits (the kernel's: TCP_KEEPIDLE/KEEPINTVL <= 32767 s, TCP_KEEPCNT <= 127).
MAX_KEEPALIVE_S = 32_767
MAX_KEEPALIVE_COUNT = 127
BALANCE_MODES = ("round_robin", "least_conn", "random_two", "source_hash")
DEFAULT_FALL = 3
DEFAULT_FAIL_TIMEOUT_MS = 10_000
DEFAULT_RESOLVE_INTERVAL_MS = 5_000
DEFAULT_PROXY_TIMEOUT_MS = 3000  # HAProxy's advice for the whole PROXY header
DEFAULT_SNI_TIMEOUT_MS = 3000
ACCEPT_PROXY_MODES = ("v1", "v2", "any")
SEND_PROXY_VERSIONS = ("v1", "v2")
#: Largest per-listener connection limits (the shared table is sized from them).
MAX_LIMIT = 1_000_000
MAX_MS = 86_400_000  # one day: the largest interval any *_ms key accepts
MAX_S = 86_400.0  # one day: the largest duration any *_s key accepts
#: The shortest ``worker_timeout_s``: a worker stamps its heartbeat every 0.5 s
#: and an idle relay loop ticks once a second, so a shorter timeout would kill
#: idle, healthy workers as hung.  Five seconds is several missed ticks.
MIN_WORKER_TIMEOUT_S = 5.0
#: Backend addresses the shared state holds (fixed: shared memory cannot grow after fork).
#: An IP address takes one; a hostname reserves ADDRESSES_PER_NAME, one per address it
#: resolves to (a DNS answer with more keeps a subset, see ``health.select_addresses``).
#: Memory: the per-worker connection counts dominate, 4 bytes x slots x 256 rows
#: = 16 MiB of shared mapping, of which each worker touches only its own 64 KiB row.
MAX_BACKEND_ADDRESSES = 16384
ADDRESSES_PER_NAME = 64
#: RFC 1123 / RFC 1035 limits on a DNS name, checked so ``getaddrinfo`` (and the
#: IDNA encoding it does first) cannot refuse a name later.
MAX_HOSTNAME = 253
MAX_LABEL = 63
MAX_THREADS = 256
MAX_WORKERS = 1024

# One label of a hostname: letters, digits, hyphens inside (RFC 1123); the
# underscore is accepted too, as container and service names use it and the
# resolver takes it.
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")


#: Longest unix socket path: ``sun_path`` is 108 bytes on Linux, with its NUL.
MAX_UNIX_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    """An address as the operator wrote it: host (name or literal) and port, or
    (``unix:/path``) the path of a Unix socket, with ``host`` "" and ``port`` 0."""

    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    def is_ip_literal(self) -> bool:
        """True for an address that needs no DNS (an IPv4/IPv6 literal, or a unix
        path: one fixed address, one backend slot), False for a hostname."""
        if self.path:
            return True
        host = self.host.split("%", 1)[0]
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                socket.inet_pton(family, host)
                return True
            except OSError:
                pass
        return False


@dataclass(frozen=True)
class Backend:
    """One upstream server of a listener, as configured (a hostname may stand for several).

    ``weight`` counts wherever the listener's ``balance`` can use it; a ``backup``
    serves only while every primary is down.
    """

    address: Endpoint
    weight: int = 1
    backup: bool = False
    #: "v1"/"v2": a PROXY header before the first byte (None: the listener's ``send_proxy``).
    send_proxy: Optional[str] = None
    #: Open connections to each of its addresses, all workers together (0: off); a backend
    #: at it is skipped (``balancer``), and with every one full clients queue or get 503.
    max_connections: int = 0


@dataclass(frozen=True)
class HealthCheck:
    """A listener's ``health_check`` table: active probes of every backend address.

    A probe connects within ``timeout_ms``; with ``send`` it sends those bytes,
    with ``expect`` the reply must start with those bytes.  ``rise`` passes in a
    row bring a backend up, ``fall`` failures in a row take it down.
    """

    interval_ms: int = 2000
    timeout_ms: int = 1000  # default: 1000, or interval_ms if shorter
    rise: int = 2
    fall: int = 3
    send: bytes = b""
    expect: bytes = b""


@dataclass(frozen=True)
class RouteConfig:
    """One ``[[tcp_proxy.routes]]`` table (issue 13): clients whose TLS ClientHello names
    one of ``server_names`` (and offers one of ``alpn``, if set) go to ``backends``,
    balanced, retried and health-checked with the route's own pool keys."""

    server_names: Tuple[str, ...]
    backends: Tuple[Backend, ...]
    name: str = ""  # "": its first server name (see ``label``)
    alpn: Optional[Tuple[str, ...]] = None  # None: any (or no) ALPN list
    balance: str = "round_robin"
    retries: Optional[int] = None
    connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS
    connect_budget_ms: Optional[int] = None
    fall: int = DEFAULT_FALL
    fail_timeout_ms: int = DEFAULT_FAIL_TIMEOUT_MS
    health_check: Optional[HealthCheck] = None
    send_proxy: Optional[str] = None

    @property
    def label(self) -> str:
        """How metrics (the ``route`` label), status and ``prefork-proxy backend`` name it:
        its ``name``, else its first server name (unique in its listener: a name two
        routes list is refused by ``ServerNameTable`` unless ALPN tells them apart)."""
        return self.name or self.server_names[0]


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[tcp_proxy]]`` section: a bind address, its backends and how to choose them.

    ``retries`` None means every other backend once; ``connect_budget_ms`` None
    means no total limit beyond ``connect_timeout_ms`` per attempt.  ``fall`` 0
    turns passive marking off.
    """

    bind: Endpoint
    backends: Tuple[Backend, ...] = ()  # empty only with routes: unmatched clients refused
    connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS
    name: str = ""
    balance: str = "round_robin"
    retries: Optional[int] = None
    connect_budget_ms: Optional[int] = None
    fall: int = DEFAULT_FALL
    fail_timeout_ms: int = DEFAULT_FAIL_TIMEOUT_MS
    resolve_interval_ms: int = DEFAULT_RESOLVE_INTERVAL_MS
    health_check: Optional[HealthCheck] = None
    #: Share the address with another process already listening on it (SO_REUSEPORT);
    #: off: binding an address in use fails with "address in use".
    reuse_port: bool = False
    tcp_keepalive: Optional[Keepalive] = None  # None: off (the default)
    # The pre-connect phase (issue 12; ``admission.compile_pipeline`` takes these):
    # every one off by default, and a listener with none of them pays nothing.
    accept_proxy: Optional[str] = None  # "v1" | "v2" | "any": a PROXY header is required
    trusted_proxies: Optional[Tuple[str, ...]] = None  # None: every source must send one
    proxy_timeout_ms: int = DEFAULT_PROXY_TIMEOUT_MS
    send_proxy: Optional[str] = None  # to every backend without its own ``send_proxy``
    allow: Optional[Tuple[str, ...]] = None
    deny: Optional[Tuple[str, ...]] = None
    max_connections: int = 0  # 0: off
    max_connections_per_source: int = 0
    max_new_connections_per_source: int = 0
    #: With backends' ``max_connections``: how long a client waits for a slot (0: 503 at once).
    queue_timeout_ms: int = 0
    #: No byte either way this long closes both sides (0: off; relay/idle.py).
    idle_timeout_ms: int = 0
    sni_timeout_ms: int = DEFAULT_SNI_TIMEOUT_MS
    routes: Tuple[RouteConfig, ...] = ()  # SNI routes, matched before the listener's backends
    #: A ``unix:`` listener's file mode (its owner: the serving user, see listeners.py).
    mode: int = 0o660
    #: An IPv6 listener takes IPv6 clients only (IPV6_V6ONLY); false: IPv4 ones too,
    #: as mapped addresses, and then no 0.0.0.0 listener can share its port.
    v6only: bool = True

    @property
    def has_limits(self) -> bool:
        """Whether any connection limit is set (the master then sizes ``ConnectionLimits``)."""
        return bool(self.max_connections or self.max_connections_per_source
                    or self.max_new_connections_per_source)

    @property
    def has_backend_limits(self) -> bool:
        """Whether a backend sets ``max_connections`` (the balancer then counts its slots)."""
        return any(b.max_connections for b in self.backends)

    def backend_send_proxy(self, backend: Backend) -> Optional[str]:
        """The PROXY header version ``backend`` gets (its own key, else the listener's)."""
        return backend.send_proxy or self.send_proxy

    @property
    def label(self) -> str:
        """How logs name this listener: its ``name`` if given, else its bind address."""
        return self.name or str(self.bind)

    #: The listener's own pool has no route name (``RoutePool.route_name`` for a route's).
    route_name = ""

    def route_pools(self) -> Tuple["RoutePool", ...]:
        """Its routes as pools (``RoutePool``), in config order (index = route index)."""
        return tuple(RoutePool(self, route, index) for index, route in enumerate(self.routes))


@dataclass(frozen=True)
class RoutePool:
    """A route's pool seen like a listener's: what balancers, health checks, status,
    metrics and ``prefork-proxy backend`` read from a pool, whichever kind it is.

    The pool keys (``backends``, ``balance``, ``retries``, timeouts, ``fall``,
    ``health_check``) are the route's; ``send_proxy`` is the route's, else the
    listener's; what belongs to the listener (``label``, ``bind``,
    ``resolve_interval_ms``, ``tcp_keepalive``) is the listener's.  Built by
    ``ListenerConfig.route_pools`` (master and workers; immutable).
    """

    listener: ListenerConfig
    route: RouteConfig
    index: int  # in listener.routes: what an SNI verdict's ``route`` names

    @property
    def label(self) -> str:
        return self.listener.label

    @property
    def bind(self) -> Endpoint:
        return self.listener.bind

    @property
    def route_name(self) -> str:
        return self.route.label

    @property
    def backends(self) -> Tuple[Backend, ...]:
        return self.route.backends

    @property
    def balance(self) -> str:
        return self.route.balance

    @property
    def retries(self) -> Optional[int]:
        return self.route.retries

    @property
    def connect_timeout_ms(self) -> int:
        return self.route.connect_timeout_ms

    @property
    def connect_budget_ms(self) -> Optional[int]:
        return self.route.connect_budget_ms

    @property
    def fall(self) -> int:
        return self.route.fall

    @property
    def fail_timeout_ms(self) -> int:
        return self.route.fail_timeout_ms

    @property
    def health_check(self) -> Optional[HealthCheck]:
        return self.route.health_check

    @property
    def resolve_interval_ms(self) -> int:
        return self.listener.resolve_interval_ms

    @property
    def send_proxy(self) -> Optional[str]:
        return self.route.send_proxy or self.listener.send_proxy

    def backend_send_proxy(self, backend: Backend) -> Optional[str]:
        """The PROXY header version ``backend`` gets (its own, the route's, the listener's)."""
        return backend.send_proxy or self.send_proxy

    @property
    def has_backend_limits(self) -> bool:
        """Whether one of the route's backends sets ``max_connections``."""
        return any(b.max_connections for b in self.route.backends)

    @property
    def queue_timeout_ms(self) -> int:
        """How long a client waits for a slot of a full route pool: the listener's key."""
        return self.listener.queue_timeout_ms


@dataclass(frozen=True)
class Keepalive:
    """A listener's ``tcp_keepalive``: probe idle peers, on the client and the backend socket.

    ``None`` fields keep the kernel's defaults (``net.ipv4.tcp_keepalive_time``
    7200 s, ``_intvl`` 75 s, ``_probes`` 9): ``tcp_keepalive = true`` only turns
    SO_KEEPALIVE on.
    """

    idle_s: Optional[int] = None  # TCP_KEEPIDLE: idle time before the first probe
    interval_s: Optional[int] = None  # TCP_KEEPINTVL: between probes
    count: Optional[int] = None  # TCP_KEEPCNT: unanswered probes before the connection is reset


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` section: process-wide settings."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    threads: Optional[int] = None  # None: "auto", see relay_threads
    relay: str = "auto"
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S
    buffer_budget_mb: int = DEFAULT_BUFFER_BUDGET_MB
    pidfile: Optional[str] = None
    log_file: Optional[str] = None
    access_log: Optional[str] = None  # a path, or "-" for stderr; None: off
    access_log_format: str = "logfmt"
    user: Optional[str] = None
    group: Optional[str] = None
    watch_config: bool = False

    @property
    def relay_threads(self) -> int:
        """Relay threads per worker: ``threads``, or with "auto" ``auto_relay_threads``."""
        if self.threads is not None:
            return self.threads
        return auto_relay_threads(usable_cpus(), self.workers, gil_enabled())


def auto_relay_threads(cpus: int, workers: int, gil: bool) -> int:
    """What ``threads = "auto"`` means: one relay thread per worker under a GIL,
    else the CPUs shared among the workers (at least one).

    Principle (one interpreter lock per worker): the relay threads of one
    worker share CPython's GIL, which each of them drops and takes back
    around every system call; two busy threads in one worker hand the lock
    back and forth on nearly every call.  Measured on 2 CPUs with 1 worker
    (issue 15, 2026-12-02): 2 relay threads made 34,799 ``futex`` calls for
    5,050 new connections (6.9 each), 1 thread 68 (0.01 each); interleaved,
    1 thread served 1.28x the new connections (per round 1.20-1.33x) and
    1.85x the kept-alive requests (0.92-1.93x) of 2.  Where there is no GIL
    (a free-threaded build), threads do run in parallel: CPUs / workers.
    """
    if gil:
        return 1
    return max(1, cpus // max(1, workers))


def gil_enabled() -> bool:
    """Whether this interpreter has a GIL (``sys._is_gil_enabled``, Python 3.13+; before: yes)."""
    probe = getattr(sys, "_is_gil_enabled", None)
    return True if probe is None else bool(probe())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class AdminConfig:
    """The ``[admin]`` section: where the HTTP admin endpoint listens; ``bind`` None: off."""

    bind: Optional[Endpoint] = None


@dataclass(frozen=True)
class Config:
    """The whole validated configuration.  ``source`` is the file it came from, if any."""

    server: ServerConfig
    listeners: Tuple[ListenerConfig, ...]
    source: Optional[str] = None
    admin: AdminConfig = field(default_factory=AdminConfig)

    def summary(self) -> str:
        """One line for ``prefork-proxy check`` and the startup log."""
        parts = [f"{lst.bind} -> {', '.join(str(b.address) for b in lst.backends) or '-'}"
                 + (f" (+{len(lst.routes)} SNI route(s))" if lst.routes else "")
                 for lst in self.listeners]
        return (f"{len(self.listeners)} listener(s), workers={self.server.workers}, "
                f"threads={self.server.relay_threads}, relay={self.server.relay}: "
                + "; ".join(parts))


# --------------------------------------------------------------------------- addresses


def parse_endpoint(text: str, *, allow_port_zero: bool = False) -> Endpoint:
    """Parse ``host:port``, ``[v6]:port`` or ``unix:/path``.  Raises ``ValueError``
    saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a \"host:port\" string, got {describe(text)}")
    text = text.strip()
    if text.startswith("unix:"):
        return Endpoint("", 0, _unix_path(text))
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or not text[close + 1:].startswith(":"):
            raise ValueError(f"expected \"[ipv6]:port\", got {text!r}")
        host, port_text = text[1:close], text[close + 2:]
        if not host or not re.fullmatch(r"[0-9A-Fa-f:.]+(%[\w.-]+)?", host):
            raise ValueError(f"expected an IPv6 literal inside [...], got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected \"host:port\", got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, as in \"[::1]:5432\"; got {text!r}")
        if host != "*":
            problem = hostname_problem(host)
            if problem:
                raise ValueError(f"expected a hostname or IP address before ':', got {text!r}: "
                                 f"{problem}")
    if not port_text.isdigit():
        raise ValueError(f"expected a numeric port after ':', got {text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"expected a port between {low} and 65535, got {text!r}")
    return Endpoint("0.0.0.0" if host == "*" else host, port)


def _unix_path(text: str) -> str:
    """The path of ``unix:/path``: absolute (the master's working directory is no
    contract), at most ``MAX_UNIX_PATH`` bytes, no NUL (no abstract sockets)."""
    path = text[len("unix:"):]
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path after \"unix:\", as in "
                         f"\"unix:/run/app.sock\"; got {text!r}")
    if "\0" in path:
        raise ValueError(f"a unix socket path cannot contain a NUL byte: {text!r}")
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise ValueError(f"a unix socket path is at most {MAX_UNIX_PATH} bytes, this one has "
                         f"{size}: {text!r}")
    return path


def hostname_problem(host: str) -> str:
    """What makes ``host`` neither an IPv4 address nor a valid DNS name ("" if nothing).

    A name is dot-separated labels of 1 to 63 characters (letters, digits,
    ``-`` inside, ``_``), 253 characters at most: exactly what ``getaddrinfo``
    will accept, so a name that passes here never makes the resolver raise
    (its IDNA step raises ``UnicodeError``, not ``OSError``, on an empty or
    overlong label).  A name whose last label is all digits would be read as
    a shorthand IPv4 address ("10.1" is 10.0.0.1), so it must be a full
    dotted quad.
    """
    try:
        socket.inet_pton(socket.AF_INET, host)
        return ""
    except OSError:
        pass
    if len(host) > MAX_HOSTNAME:
        return f"a name is at most {MAX_HOSTNAME} characters, this one has {len(host)}"
    labels = host.split(".")
    for label in labels:
        if not label:
            return "empty label (two dots in a row, or a dot at an end)"
        if len(label) > MAX_LABEL:
            return f"label {label[:20]!r}... is {len(label)} characters, at most {MAX_LABEL}"
        if not _LABEL.match(label):
            return (f"label {label!r}: expected letters, digits, '-' and '_' only, "
                    "not starting or ending with '-'")
    if labels[-1].isdigit():
        return "not a valid IPv4 address (expected four numbers 0-255, as in 10.0.0.1)"
    try:
        host.encode("idna")
    except UnicodeError as exc:  # pragma: no cover - the checks above cover what IDNA checks
        return f"not a valid DNS name: {exc}"
    return ""


def numeric_address(endpoint: Endpoint) -> Tuple[int, tuple]:
    """``(family, sockaddr)`` of an IP literal, as the master writes it into shared memory.

    Raises ``ValueError`` if the kernel could not use it: a scope id (``%eth0``,
    ``%2``) must name an interface that exists.  Config validation calls this,
    so what passes ``check`` is what the master can turn into a socket address.
    """
    if endpoint.path:
        return socket.AF_UNIX, endpoint.path  # type: ignore[return-value]
    host, _, scope = endpoint.host.partition("%")
    if scope:
        try:
            if scope.isdigit():
                socket.if_indextoname(int(scope))
            else:
                socket.if_nametoindex(scope)
        except (OSError, OverflowError, ValueError):
            raise ValueError(f"{endpoint}: scope id {scope!r} names no network interface "
                             "of this host") from None
    try:
        info = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)[0]
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{endpoint}: not a usable IP address: {exc}") from None
    return info[0], info[4]


# --------------------------------------------------------------------------- declarations
#
# Every key of the file, once: name, kind (type and range), doc; defaults are the
# dataclass fields' above.  README's configuration table is generated from these
# (scripts/config_table.py; a test keeps them equal), so a key added here (and its
# dataclass field) is validated, reported with file/line/section/key and documented.


class Address(Kind):
    """``host:port`` / ``[v6]:port``, usable as written (see ``parse_endpoint``, ``_usable``)."""

    def __init__(self, port_zero: bool = False, unix: bool = True) -> None:
        self.port_zero, self.unix = port_zero, unix
        self.expected = ('"host:port", "[ipv6]:port" or "unix:/path"' if unix
                         else '"host:port" or "[ipv6]:port"') + (
            " (port 0: any free port)" if port_zero else "")

    def parse(self, value: Any, where: Where) -> Endpoint:
        try:
            endpoint = _usable(parse_endpoint(value, allow_port_zero=self.port_zero))
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if endpoint.is_unix and not self.unix:
            raise Invalid(f"expected {self.expected}: a unix socket is not supported here")
        return endpoint


class Cidrs(Kind):
    """A non-empty list of CIDRs (``acl.cidr_errors`` decides), as a tuple of strings."""

    expected = 'a non-empty list of CIDRs like ["192.0.2.0/24", "2001:db8::/32"]'

    def parse(self, value: Any, where: Where) -> Tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.wrong(value)
        errors = acl.cidr_errors(value)
        if errors:
            raise Invalid(f"expected {self.expected}: {errors[0]}")
        return tuple(value)


class FileMode(Kind):
    """A file mode as an octal string ("0660", "660"), as ``chmod`` takes it."""

    expected = 'an octal file mode as a string, like "0660" (owner and group read/write)'

    def parse(self, value: Any, where: Where) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
            raise self.wrong(value)
        return int(value, 8)


def _family_keys(listener: ListenerConfig) -> None:
    """``mode`` belongs to a unix listener, ``v6only = false`` to an IPv6 one."""
    if listener.mode != 0o660 and not listener.bind.is_unix:
        raise Invalid(f"mode is for a \"unix:/path\" bind only, not {listener.bind}",
                      key="mode")
    if not listener.v6only and (listener.bind.is_unix or ":" not in listener.bind.host):
        raise Invalid(f"v6only is for an IPv6 bind (\"[::]:port\") only, not "
                      f"{listener.bind}", key="v6only")
    if listener.bind.is_unix and listener.reuse_port:
        raise Invalid("reuse_port does not apply to a unix socket: one file, one listening "
                      "socket", key="reuse_port")


def _usable(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` if the master can turn it into a socket address later; else ValueError."""
    if endpoint.is_ip_literal():
        numeric_address(endpoint)
    return endpoint


# Cross-key checks, run on the built dataclass: each raises Invalid naming the key at fault.

def _timeout_within_interval(health: HealthCheck) -> None:
    if health.timeout_ms > health.interval_ms:
        raise Invalid(f"expected at most interval_ms ({health.interval_ms}), got "
                      f"{health.timeout_ms}: a probe must end before the next one is due",
                      key="timeout_ms")


def _budget_covers_timeout(listener: "ListenerConfig | RouteConfig") -> None:
    budget, timeout = listener.connect_budget_ms, listener.connect_timeout_ms
    if budget is not None and budget < timeout:
        raise Invalid(f"expected at least connect_timeout_ms ({timeout}), got {budget}: the "
                      "budget covers every attempt together", key="connect_budget_ms")


def _proxy_keys(listener: ListenerConfig) -> None:
    if listener.trusted_proxies is not None and not listener.accept_proxy:
        raise Invalid("trusted_proxies needs accept_proxy (\"v1\", \"v2\" or \"any\"): "
                      "without it no PROXY header is read", key="trusted_proxies")


def _one_primary(listener: ListenerConfig) -> None:
    if listener.backends and all(b.backup for b in listener.backends):
        raise Invalid("every backend is a backup: expected at least one primary (a backend "
                      "without backup = true)", key="backends")


ADMIN = Table(AdminConfig, [
    # Port 0 (any free port, logged at start) is for tests and ad-hoc runs.
    Key("bind", Address(port_zero=True, unix=False), "the HTTP admin endpoint: /live, "
        "/ready, /status, /metrics; a non-loopback bind is warned",
        missing='expected "host:port" for the admin endpoint, e.g. "127.0.0.1:9901"',
        default_doc="off"),
], expected='an [admin] table, e.g. [admin] with bind = "127.0.0.1:9901"', empty_is_default=True)

MS = "milliseconds"

SERVER = Table(ServerConfig, [
    Key("workers", Int(1, MAX_WORKERS), "worker processes (SIGTTIN / SIGTTOU add / remove one)",
        default_doc="the CPU count"),
    Key("threads", Auto(Int(1, MAX_THREADS)), "relay threads per worker; connections never "
        "pin threads", default_doc='"auto": 1 (with a GIL); without one, usable CPUs / workers'),
    Key("relay", OneOf(RELAY_MODES), "how bytes move: splice where it works, or copy"),
    Key("drain_timeout_s", Seconds(0.0, MAX_S),
        "how long a graceful stop lets open connections run"),
    Key("worker_timeout_s", Seconds(MIN_WORKER_TIMEOUT_S, MAX_S),
        "a worker without a heartbeat this long is replaced"),
    Key("buffer_budget_mb", Int(1, MAX_BUFFER_BUDGET_MB, "MiB"),
        "per worker: bytes held for slow readers; when spent, streams wait"),
    Key("pidfile", Text(), "for reload / stop / status", default_doc="none"),
    Key("log_file", Text(), "log here instead of stderr; SIGUSR1 reopens it",
        default_doc="stderr"),
    Key("access_log", Text(), 'one line per finished connection, to this file ("-": '
        "stderr); SIGUSR1 reopens it", default_doc="off"),
    Key("access_log_format", OneOf(("logfmt", "json")), "the access log's line format"),
    Key("user", Text(), "bind as root, then serve as this user", default_doc="unchanged"),
    Key("group", Text(), "and this group", default_doc="the user's group"),
    Key("watch_config", Flag(), "poll the config file's content (every 1 s) and reload as "
        "SIGHUP does when it changes (a Kubernetes ConfigMap's symlink swap included)"),
], expected="a [server] table")

HEALTH_CHECK = Table(HealthCheck, [
    Key("interval_ms", Int(10, MAX_MS, MS), "a probe of every backend address this often"),
    Key("timeout_ms", Int(1, MAX_MS, MS), "a probe's connect (and reply) within this",
        default_doc="1000, or interval_ms if shorter",
        default_from=lambda values: min(HealthCheck.timeout_ms, values["interval_ms"])),
    Key("rise", Int(1, 1000, "consecutive passes"),
        "passes in a row that bring a backend (back) up"),
    Key("fall", Int(1, 1000, "consecutive failures"), "failures in a row that take it down"),
    Key("send", Text(note="TOML escapes such as \\r\\n work", encode=True),
        "bytes sent once connected", default_doc="nothing"),
    Key("expect", Text(note="TOML escapes such as \\r\\n work", encode=True),
        "the reply must start with these bytes", default_doc="any reply, or none"),
], expected="a table, e.g. [tcp_proxy.health_check] or health_check = { interval_ms = 2000 }",
   checks=[_timeout_within_interval])

KEEPALIVE = Table(Keepalive, [
    Key("idle_s", Int(1, MAX_KEEPALIVE_S), "TCP_KEEPIDLE: idle time before the first probe",
        default_doc="the kernel's (7200)"),
    Key("interval_s", Int(1, MAX_KEEPALIVE_S), "TCP_KEEPINTVL: time between probes",
        default_doc="the kernel's (75)"),
    Key("count", Int(1, MAX_KEEPALIVE_COUNT),
        "TCP_KEEPCNT: unanswered probes before the connection is reset",
        default_doc="the kernel's (9)"),
], expected="true, false or a table like { idle_s = 600, interval_s = 60, count = 5 }",
   inline=True, flag=True)

BACKEND = Table(Backend, [
    Key("address", Address(), "the backend (a hostname may resolve to several)", missing=""),
    Key("weight", Int(1, 1000), "its share wherever balance uses weights"),
    Key("backup", Flag(), "serves only while every primary is down"),
    Key("send_proxy", OneOf(SEND_PROXY_VERSIONS), "a PROXY header of this version before "
        "the first byte to this backend (and health checks send LOCAL/UNKNOWN first)",
        default_doc="the listener's send_proxy"),
    Key("max_connections", Int(0, MAX_LIMIT, note="0: off"), "open connections to each "
        "of its addresses, all workers together; one at it is skipped by every balance "
        "mode (see queue_timeout_ms)"),
], expected='"host:port" or an inline table', inline=True, shorthand="address")
BACKEND_LIST = Array(BACKEND, "backends", 'a non-empty list of "host:port" strings or '
                     '{ address = "host:port", weight = N } tables')

def _route_primary(route: RouteConfig) -> None:
    if all(b.backup for b in route.backends):
        raise Invalid("every backend is a backup: expected at least one primary (a backend "
                      "without backup = true)", key="backends")


ROUTE = Table(RouteConfig, [
    Key("server_names", Array(Text(), "server_names", 'a non-empty list of names like '
                              '["api.example.com", "*.api.example.com"]'),
        "exact names and one leading wildcard label, matched case-insensitively",
        missing="expected a list of server names"),
    Key("backends", BACKEND_LIST, "where its clients go",
        missing='expected a list of "host:port" strings'),
    Key("name", Text(), "how metrics (the route label), status and `prefork-proxy backend` "
        "name it; unique in its listener", default_doc="its first server name"),
    Key("alpn", Array(Text(), "alpn", 'a non-empty list of protocols like ["h2"]'),
        "also match on the ALPN list the client offers", default_doc="any"),
    Key("balance", OneOf(BALANCE_MODES), "how a backend is chosen"),
    Key("retries", Int(0, 1000, note="other backends tried after a failed connect"),
        "failover after a refused or timed-out connect", default_doc="each other backend once"),
    Key("connect_timeout_ms", Int(1, 3_600_000, MS), "each connect attempt within this"),
    Key("connect_budget_ms", Int(1, MAX_MS, MS), "every attempt together",
        default_doc="connect_timeout_ms per attempt"),
    Key("fall", Int(0, 1000, note="0: never"), "passive health"),
    Key("fail_timeout_ms", Int(1, MAX_MS, MS), "passive: how long a backend marked down is "
        "skipped"),
    Key("health_check", HEALTH_CHECK, "active checks of its backends", default_doc="none"),
    Key("send_proxy", OneOf(SEND_PROXY_VERSIONS), "a PROXY header to its backends",
        default_doc="the listener's send_proxy"),
], expected="a [[tcp_proxy.routes]] table", checks=[_route_primary, _budget_covers_timeout])


class Routes(Array):
    """``[[tcp_proxy.routes]]``: each route's keys, then the set as ``ServerNameTable``
    compiles it (names valid, none shadowed by an earlier route), an error naming the
    route at fault and pointing at its header line."""

    def __init__(self) -> None:
        super().__init__(ROUTE, "routes", "[[tcp_proxy.routes]] tables")

    def parse(self, value: Any, where: Where) -> tuple:
        routes = super().parse(value, where)
        for count in range(1, len(routes) + 1):  # the first route whose names break the table
            try:
                ServerNameTable([r.server_names for r in routes[:count]],
                                [r.alpn for r in routes[:count]])
            except ValueError as exc:
                message = re.sub(r"\broute (\d+)\b", lambda m: f"route {int(m[1]) + 1}",
                                 str(exc))
                raise where.item(count - 1, self.label, False).fail(
                    f"server_names: {message}") from None
        seen: dict[str, int] = {}
        for index, route in enumerate(routes):
            earlier = seen.setdefault(route.label, index)
            if earlier != index:
                raise where.item(index, self.label, False).field("name", False).fail(
                    f"route {earlier + 1} is already named {route.label!r}: a route's name "
                    "(its first server name unless set) is unique in its listener")
        return routes


def _backends_or_routes(listener: ListenerConfig) -> None:
    # A listener's own backends are its default pool: optional only when routes take
    # its clients (unmatched ones are then refused with 403).
    if not listener.backends and not listener.routes:
        raise Invalid('missing: expected a list of "host:port" strings (optional only '
                      'with [[tcp_proxy.routes]])', key="backends")


LISTENER = Table(ListenerConfig, [
    Key("bind", Address(port_zero=True), "the address to listen on",
        missing='expected "host:port" to listen on, e.g. "0.0.0.0:5432"'),
    Key("backends", BACKEND_LIST,
        "where connections go (with routes: clients no route takes)",
        default_doc="required (optional with routes: unmatched clients are then refused)"),
    Key("connect_timeout_ms", Int(1, 3_600_000, MS), "each connect attempt within this"),
    Key("name", Text(non_empty=False), "how logs name the listener", default_doc="its bind"),
    Key("balance", OneOf(BALANCE_MODES), "how a backend is chosen"),
    Key("retries", Int(0, 1000, note="other backends tried after a failed connect"),
        "failover after a refused or timed-out connect", default_doc="each other backend once"),
    Key("connect_budget_ms", Int(1, MAX_MS, MS), "every attempt together (at least "
        "connect_timeout_ms)", default_doc="connect_timeout_ms per attempt"),
    Key("fall", Int(0, 1000, note="consecutive connect failures that mark a backend down; "
                                  "0: never"), "passive health"),
    Key("fail_timeout_ms", Int(1, MAX_MS, MS), "passive: how long a backend marked down is "
        "skipped"),
    Key("resolve_interval_ms", Int(100, MAX_MS, MS), "backend hostnames are resolved again "
        "this often"),
    Key("health_check", HEALTH_CHECK, "active checks by the health-check process",
        default_doc="none"),
    Key("reuse_port", Flag(), "share the address with another process listening on it"),
    Key("tcp_keepalive", KEEPALIVE, "SO_KEEPALIVE on the client's and the backend's socket "
        "(true: the kernel's timings)", default_doc="off"),
    Key("accept_proxy", OneOf(ACCEPT_PROXY_MODES), "a PROXY header is required first from "
        "trusted sources; its client address is what allow/deny, limits, source_hash and "
        "send_proxy use", default_doc="off"),
    Key("trusted_proxies", Cidrs(), "with accept_proxy: sources that must send a header; "
        "others are served as direct clients", default_doc="every source"),
    Key("proxy_timeout_ms", Int(1, MAX_MS, MS), "the whole PROXY header within this of "
        "accept, else closed (status 400)"),
    Key("send_proxy", OneOf(SEND_PROXY_VERSIONS), "a PROXY header before the first byte "
        "to every backend (a backend's send_proxy overrides)", default_doc="off"),
    Key("allow", Cidrs(), "only these client addresses get in (others: RST, status 403)",
        default_doc="every address"),
    Key("deny", Cidrs(), "these client addresses are refused (checked before allow)",
        default_doc="none"),
    Key("max_connections", Int(0, MAX_LIMIT, note="0: off"), "open connections of this "
        "listener, all workers together; above it the listener stops accepting and clients "
        "wait in the kernel queue"),
    Key("max_connections_per_source", Int(0, MAX_LIMIT, note="0: off"), "open connections "
        "per client address, all workers together; above it, refused (status 503)"),
    Key("max_new_connections_per_source", Int(0, MAX_LIMIT, note="0: off"), "new "
        "connections per client address per second, all workers together"),
    Key("queue_timeout_ms", Int(0, MAX_MS, MS), "when every backend is at its "
        "max_connections: a client waits this long for a slot (FIFO per worker, its bytes "
        "unread), then is refused (status 503, term sQ); 0: refused at once"),
    Key("idle_timeout_ms", Int(0, MAX_MS, MS), "no byte either way for this long closes "
        "both sides (a FIN; term cD when waiting for the client, sD for the server); 0: off"),
    Key("sni_timeout_ms", Int(1, MAX_MS, MS), "with routes: the TLS ClientHello within "
        "this of accept"),
    Key("routes", Routes(), "SNI routes: a TLS client goes to the first route whose "
        "server_names (and alpn) match its ClientHello, else to the listener's backends",
        default_doc="none"),
    Key("mode", FileMode(), 'a "unix:" listener\'s file mode; its owner is the serving '
        "user (server.user/group)", default_doc='"0660"'),
    Key("v6only", Flag(), "an IPv6 listener takes IPv6 clients only (false: IPv4 too, "
        "mapped)"),
], checks=[_backends_or_routes, _budget_covers_timeout, _one_primary, _proxy_keys,
           _family_keys])


def _distinct_binds(listeners: Sequence[ListenerConfig]) -> Optional[Tuple[int, str]]:
    """(index, message) of the first listener binding an address an earlier one binds."""
    seen: dict[Tuple[str, int, str], int] = {}
    for index, listener in enumerate(listeners):
        key = (listener.bind.host, listener.bind.port, listener.bind.path)
        if (listener.bind.port or listener.bind.path) and key in seen:  # port 0: a fresh one each
            return index, f"duplicate bind address: tcp_proxy[{seen[key] + 1}] already binds it"
        seen[key] = index
    return None


def _address_slots(listeners: Sequence[ListenerConfig]) -> Optional[str]:
    needed = sum(1 if b.address.is_ip_literal() else ADDRESSES_PER_NAME
                 for listener in listeners
                 for pool in (listener, *listener.routes) for b in pool.backends)
    if needed > MAX_BACKEND_ADDRESSES:
        return (f"too many backends: they need {needed} address slots (an IP address takes 1, "
                f"a hostname {ADDRESSES_PER_NAME}), at most {MAX_BACKEND_ADDRESSES}")
    return None


@dataclass(frozen=True)
class Section:
    """A top-level table of the file, read into ``Config.<attr>``.

    ``many``: written as ``[[name]]``, at least one (``what`` says what one is).
    """

    name: str
    table: Table
    attr: str = ""
    many: bool = False
    what: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attr", self.attr or self.name)

    @property
    def header(self) -> str:
        return f"[[{self.name}]]" if self.many else f"[{self.name}]"

    def label(self, doc: Any, index: int) -> str:
        """How messages name the section: ``tcp_proxy[2] (bind "...")`` counts from 1."""
        if not self.many:
            return self.name
        bind = doc.get("bind") if isinstance(doc, dict) else None
        return f"{self.name}[{index + 1}]" + (f" (bind \"{bind}\")" if isinstance(bind, str)
                                              else "")


SECTIONS = (Section("server", SERVER), Section("admin", ADMIN),
            Section("tcp_proxy", LISTENER, attr="listeners", many=True,
                    what='listener with "bind" and "backends"'))


def _section(name: str) -> Section:
    return next(s for s in SECTIONS if s.name == name)


def reference_rows() -> Iterator[Row]:
    """Every key as README's configuration table lists it (scripts/config_table.py)."""
    for section in SECTIONS:
        yield from rows(section.table, section.header)


# --------------------------------------------------------------------------- loading


def load_file(path: str, *, workers: Optional[int] = None) -> Config:
    """Read, parse and validate a config file.  ``workers`` overrides ``[server] workers``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    return load_text(raw.decode("utf-8", errors="replace"), source=path, workers=workers)


def load_text(text: str, *, source: str = "<config>", workers: Optional[int] = None) -> Config:
    """Parse and validate TOML text; ``source`` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already ends with "(at line L, column C)".
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    config = _validate(document, Source(text, source))
    if workers is not None:
        config = replace(config, server=replace(config.server, workers=check_workers(workers)))
    return config


def from_arguments(binds: Sequence[str], backends: Sequence[str], *,
                   connect_timeout_ms: int = DEFAULT_CONNECT_TIMEOUT_MS,
                   workers: Optional[int] = None, threads: Optional[int] = None,
                   relay: Optional[str] = None) -> Config:
    """Build a config from command-line style arguments, validated like a file.

    Every ``bind`` gets the same backends; used by ``start --bind`` and ``TcpProxy``.
    """
    document: dict[str, Any] = {
        "server": {},
        "tcp_proxy": [{"bind": b, "backends": list(backends),
                       "connect_timeout_ms": connect_timeout_ms} for b in binds],
    }
    for key, value in (("workers", workers), ("threads", threads), ("relay", relay)):
        if value is not None:
            document["server"][key] = value
    return _validate(document, Source("", "command line"))


def with_admin(config: Config, bind: Optional[str]) -> Config:
    """Apply ``start --admin ADDR`` (validated like ``[admin] bind``); None keeps the file's."""
    if bind is None:
        return config
    return replace(config, admin=_read_section(_section("admin"), {"bind": bind},
                                               Source("", "command line")))


def check_workers(value: Any) -> int:
    """Validate a worker count from any source (file, CLI, API)."""
    kind = SERVER.key("workers").kind
    try:
        return kind.parse(value, None)  # type: ignore[arg-type]  # scalars ignore where
    except Invalid as exc:
        raise ConfigError(f"workers: {exc.message}") from None


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply overrides (command line, environment) to ``[server]``, validated like the file.

    Keys are ``[server]`` keys; ``None`` values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return config
    merged = {key: value for key, value in vars(config.server).items() if value is not None}
    merged.update(overrides)
    return replace(config, server=_read_section(_section("server"), merged,
                                                Source("", "command line")))


# --------------------------------------------------------------------------- validation


def _read_section(section: Section, doc: Any, source: Source, index: int = 0) -> Any:
    path = (section.name, index) if section.many else (section.name,)
    return section.table.build(doc, Where(source, path, section.label(doc, index)))


def _validate(document: Mapping[str, Any], source: Source) -> Config:
    """A parsed TOML document -> ``Config``, or the first ``ConfigError``."""
    names = [s.name for s in SECTIONS]
    unknown = sorted(set(document) - set(names))
    if unknown:
        headers = [s.header for s in SECTIONS]
        listed = ", ".join(headers[:-1]) + " and " + headers[-1]
        raise ConfigError(f"{source.name}: unknown top-level key or section \"{unknown[0]}\": "
                          f"expected {listed} sections")
    values: dict[str, Any] = {}
    for section in SECTIONS:
        doc = document.get(section.name)
        if section.many:
            if doc is None or doc == []:
                raise ConfigError(f"{source.name}: no {section.header} section: expected at "
                                  f"least one {section.what}")
            if not isinstance(doc, list) or not all(isinstance(d, dict) for d in doc):
                raise ConfigError(f"{source.name}: \"{section.name}\" must be written as "
                                  f"{section.header} sections (an array of tables)")
            values[section.attr] = tuple(_read_section(section, d, source, i)
                                         for i, d in enumerate(doc))
        else:
            doc = {} if doc is None else doc
            if not isinstance(doc, dict):
                raise Where(source, (section.name,), section.name).fail(
                    f"expected {section.table.expected}")
            values[section.attr] = _read_section(section, doc, source)
    listeners, docs = values["listeners"], document["tcp_proxy"]
    listeners_section = _section("tcp_proxy")
    duplicate = _distinct_binds(listeners)
    if duplicate:
        index, message = duplicate
        where = Where(source, ("tcp_proxy", index), listeners_section.label(docs[index], index))
        raise where.field("bind", False).fail(message)
    too_many = _address_slots(listeners)
    if too_many:
        raise ConfigError(f"{source.name}: {too_many}")
    return Config(**values, source=None if source.name == "command line" else source.name)
