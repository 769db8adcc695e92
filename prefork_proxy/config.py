"""The configuration: TOML text -> frozen dataclasses, with every check in one place.

Owned by the master, which loads it at start and on every reload; workers get
the resulting ``Config`` object through ``fork`` and never parse anything.
``prefork-proxy check`` calls ``load_file`` without binding anything.

The file speaks the seed's language::

    [server]                 # optional
    workers = 8              # default: CPU count
    threads = "auto"         # relay threads per worker (auto: CPUs / workers, at least 1)
    relay = "auto"           # "auto" | "splice" | "copy"
    drain_timeout_s = 30     # how long a stopping worker lets streams finish (0 to 86400)
    worker_timeout_s = 30    # a worker silent this long is hung (5 to 86400)
    buffer_budget_mb = 64    # per worker: bytes held for slow readers (buffers, pipes)

    [[tcp_proxy]]            # one listener per section
    bind = "0.0.0.0:5432"    # "[::1]:5432" for IPv6
    backends = ["db-primary:5432", { address = "db-replica:5432", weight = 2 },
                { address = "db-dr:5432", backup = true }]
    connect_timeout_ms = 3000
    balance = "round_robin"  # | "least_conn" | "random_two" | "source_hash"
    retries = 2              # other backends tried when one fails (default: every one once)
    connect_budget_ms = 5000 # all attempts together (default: no total limit)
    fall = 3                 # passive: consecutive connect failures that mark a backend down
    fail_timeout_ms = 10000  # passive: how long it then stays down before it is tried again
    resolve_interval_ms = 5000   # how often backend hostnames are resolved again
    tcp_keepalive = true     # or { idle_s = 600, interval_s = 60, count = 5 }; default off

    [admin]                  # optional: the HTTP admin endpoint (off unless configured)
    bind = "127.0.0.1:9901"  # /live, /ready, /status, /metrics; a non-loopback bind is warned

    [tcp_proxy.health_check] # optional: active checks, by the health-check process
    interval_ms = 2000
    timeout_ms = 1000
    rise = 2                 # consecutive passes that bring a backend (back) up
    fall = 3                 # consecutive failures that take it down
    send = "PING\\r\\n"      # optional: bytes sent once connected
    expect = "+PONG"         # optional: the reply must start with these bytes

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

import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence, Tuple

from prefork_proxy.errors import ConfigError

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


@dataclass(frozen=True)
class Endpoint:
    """A TCP address as the operator wrote it: host (name or literal) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def is_ip_literal(self) -> bool:
        """True for an IPv4/IPv6 address (no DNS needed), False for a hostname."""
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
class ListenerConfig:
    """One ``[[tcp_proxy]]`` section: a bind address, its backends and how to choose them.

    ``retries`` None means every other backend once; ``connect_budget_ms`` None
    means no total limit beyond ``connect_timeout_ms`` per attempt.  ``fall`` 0
    turns passive marking off.
    """

    bind: Endpoint
    backends: Tuple[Backend, ...]
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

    @property
    def label(self) -> str:
        """How logs name this listener: its ``name`` if given, else its bind address."""
        return self.name or str(self.bind)


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
    user: Optional[str] = None
    group: Optional[str] = None

    @property
    def relay_threads(self) -> int:
        """Relay threads per worker: ``threads``, or with "auto" the CPUs this
        process may use divided among the workers, at least one.

        Principle (one interpreter lock per worker): the relay threads of one
        worker share CPython's GIL, which each of them drops and takes back
        around every system call; two busy threads in one worker hand the
        lock back and forth on nearly every call.  Measured here on 2 CPUs
        with 2 workers (interleaved A/Bs), 1 relay thread per worker served
        1-14 % more kept-alive requests and up to 24 % more new connections
        than 2, at 6 % less CPU per request.  Extra threads pay only
        where there are CPUs to spare for the time spent inside system calls
        (``splice`` of bulk streams), hence CPUs / workers.
        """
        if self.threads is not None:
            return self.threads
        return max(1, usable_cpus() // self.workers)


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
        parts = [f"{lst.bind} -> {', '.join(str(b.address) for b in lst.backends)}"
                 for lst in self.listeners]
        return (f"{len(self.listeners)} listener(s), workers={self.server.workers}, "
                f"threads={self.server.relay_threads}, relay={self.server.relay}: "
                + "; ".join(parts))


# --------------------------------------------------------------------------- addresses


def parse_endpoint(text: str, *, allow_port_zero: bool = False) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port``.  Raises ``ValueError`` saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a \"host:port\" string, got {_describe(text)}")
    text = text.strip()
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


def check_seconds(value: Any, low: float, high: float) -> Optional[float]:
    """``value`` as a float if it is a finite number of seconds in [low, high], else None.

    Booleans are not numbers here (TOML ``true`` is not 1 second); ``nan`` and
    ``inf`` fail every comparison's intent, so they are rejected explicitly.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or not low <= seconds <= high:
        return None
    return seconds


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
    config = _Validator(text, source).config(document)
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
    return _Validator("", "command line").config(document)


def with_admin(config: Config, bind: Optional[str]) -> Config:
    """Apply ``start --admin ADDR`` (validated like ``[admin] bind``); None keeps the file's."""
    if bind is None:
        return config
    return replace(config, admin=_Validator("", "command line").admin({"bind": bind}))


def check_workers(value: Any) -> int:
    """Validate a worker count from any source (file, CLI, API)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f"workers: expected an integer between 1 and {MAX_WORKERS}, "
                          f"got {_describe(value)}")
    return value


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply overrides (command line, environment) to ``[server]``, validated like the file.

    Keys are ``[server]`` keys; ``None`` values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return config
    merged = {key: value for key, value in vars(config.server).items() if value is not None}
    merged.update(overrides)
    server = _Validator("", "command line").server(merged)
    return replace(config, server=server)


# --------------------------------------------------------------------------- validation


def _usable(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` if the master can turn it into a socket address later; else ValueError."""
    if endpoint.is_ip_literal():
        numeric_address(endpoint)
    return endpoint


def _is_int_between(value: Any, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _describe(value: Any) -> str:
    """How an error message shows a wrong value: its TOML type and the value itself."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = next((name for t, name in kinds.items() if type(value) is t), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{kind} {shown}"


class _Validator:
    """Turns a parsed TOML document into a ``Config`` or raises the first ``ConfigError``."""

    SERVER_KEYS = ("workers", "threads", "relay", "drain_timeout_s", "worker_timeout_s",
                   "buffer_budget_mb", "pidfile", "log_file", "user", "group")
    LISTENER_KEYS = ("bind", "backends", "connect_timeout_ms", "name", "balance", "retries",
                     "connect_budget_ms", "fall", "fail_timeout_ms", "resolve_interval_ms",
                     "health_check", "reuse_port", "tcp_keepalive")
    KEEPALIVE_KEYS = ("idle_s", "interval_s", "count")
    BACKEND_KEYS = ("address", "weight", "backup")
    HEALTH_KEYS = ("interval_ms", "timeout_ms", "rise", "fall", "send", "expect")
    ADMIN_KEYS = ("bind",)

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    # -- error reporting

    def _line_of(self, header: str, occurrence: int, key: Optional[str]) -> Optional[int]:
        """1-based line of ``key`` inside the ``occurrence``-th ``header`` section, if found."""
        header_re = re.compile(r"^\s*" + re.escape(header) + r"\s*(#.*)?$")
        seen, start = 0, None
        for number, line in enumerate(self.lines, 1):
            if header_re.match(line):
                if seen == occurrence:
                    start = number
                    break
                seen += 1
        if start is None:
            return None
        if key is None:
            return start
        key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if re.match(r"^\s*\[", line):
                break
            if key_re.match(line):
                return number
        return start

    def _health_line(self, occurrence: int, key: Optional[str]) -> Optional[int]:
        """Line of ``key`` in the ``occurrence``-th listener's ``health_check`` table.

        The table is either a ``[tcp_proxy.health_check]`` section after the
        listener's header, or an inline ``health_check = { ... }`` line in it.
        """
        start = self._line_of("[[tcp_proxy]]", occurrence, None)
        if start is None:
            return None
        inline = self._line_of("[[tcp_proxy]]", occurrence, "health_check")
        sub_re = re.compile(r"^\s*\[\s*tcp_proxy\s*\.\s*health_check\s*\]\s*(#.*)?$")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if re.match(r"^\s*\[\[", line):
                break
            if sub_re.match(line):
                if key is None:
                    return number
                key_re = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
                for inner in range(number + 1, len(self.lines) + 1):
                    if re.match(r"^\s*\[", self.lines[inner - 1]):
                        break
                    if key_re.match(self.lines[inner - 1]):
                        return inner
                return number
        return inline if inline != start else start

    def fail(self, section: str, key: Optional[str], expected: str, *,
             header: str = "", occurrence: int = 0) -> ConfigError:
        if header == "health_check":
            line = self._health_line(occurrence, key)
            key = f"health_check.{key}" if key else "health_check"
        else:
            line = self._line_of(header, occurrence, key) if header else None
        where = f"{self.source}:{line}" if line else self.source
        key_part = f": key \"{key}\"" if key else ""
        return ConfigError(f"{where}: {section}{key_part}: {expected}")

    # -- sections

    def config(self, document: Mapping[str, Any]) -> Config:
        unknown = sorted(set(document) - {"server", "tcp_proxy", "admin"})
        if unknown:
            raise ConfigError(f"{self.source}: unknown top-level key or section "
                              f"\"{unknown[0]}\": expected [server], [admin] and [[tcp_proxy]] "
                              "sections")
        server_doc = document.get("server", {})
        if not isinstance(server_doc, dict):
            raise self.fail("server", None, "expected a [server] table", header="[server]")
        server = self.server(server_doc)
        admin_doc = document.get("admin", {})
        if not isinstance(admin_doc, dict):
            raise self.fail("admin", None, "expected an [admin] table, e.g. [admin] with "
                            "bind = \"127.0.0.1:9901\"", header="[admin]")
        admin = self.admin(admin_doc)
        sections = document.get("tcp_proxy")
        if sections is None or sections == []:
            raise ConfigError(f"{self.source}: no [[tcp_proxy]] section: expected at least one "
                              "listener with \"bind\" and \"backends\"")
        if not isinstance(sections, list) or not all(isinstance(s, dict) for s in sections):
            raise ConfigError(f"{self.source}: \"tcp_proxy\" must be written as [[tcp_proxy]] "
                              "sections (an array of tables)")
        listeners = tuple(self.listener(s, i) for i, s in enumerate(sections))
        seen: dict[Tuple[str, int], int] = {}
        for index, listener in enumerate(listeners):
            key = (listener.bind.host, listener.bind.port)
            if listener.bind.port and key in seen:
                raise self.fail(f"tcp_proxy[{index + 1}] (bind \"{listener.bind}\")", "bind",
                                f"duplicate bind address: tcp_proxy[{seen[key] + 1}] "
                                "already binds it", header="[[tcp_proxy]]", occurrence=index)
            seen[key] = index
        needed = sum(1 if b.address.is_ip_literal() else ADDRESSES_PER_NAME
                     for listener in listeners for b in listener.backends)
        if needed > MAX_BACKEND_ADDRESSES:
            raise ConfigError(f"{self.source}: too many backends: they need {needed} address "
                              f"slots (an IP address takes 1, a hostname {ADDRESSES_PER_NAME}), "
                              f"at most {MAX_BACKEND_ADDRESSES}")
        return Config(server=server, listeners=listeners,
                      source=None if self.source == "command line" else self.source,
                      admin=admin)

    def server(self, doc: Mapping[str, Any]) -> ServerConfig:
        def fail(key: Optional[str], expected: str) -> ConfigError:
            return self.fail("server", key, expected, header="[server]")

        for key in doc:
            if key not in self.SERVER_KEYS:
                raise fail(key, "unknown key: expected one of " + ", ".join(self.SERVER_KEYS))
        values: dict[str, Any] = {}
        if "workers" in doc:
            try:
                values["workers"] = check_workers(doc["workers"])
            except ConfigError:
                raise fail("workers", f"expected an integer between 1 and {MAX_WORKERS}, "
                                      f"got {_describe(doc['workers'])}") from None
        if "threads" in doc:
            threads = doc["threads"]
            if threads != "auto":
                if isinstance(threads, bool) or not isinstance(threads, int) \
                        or not 1 <= threads <= MAX_THREADS:
                    raise fail("threads", f"expected \"auto\" or an integer between 1 and "
                                          f"{MAX_THREADS}, got {_describe(threads)}")
                values["threads"] = threads
        if "relay" in doc:
            if doc["relay"] not in RELAY_MODES:
                raise fail("relay", "expected one of \"auto\", \"splice\", \"copy\", "
                                    f"got {_describe(doc['relay'])}")
            values["relay"] = doc["relay"]
        for key, low in (("drain_timeout_s", 0.0), ("worker_timeout_s", MIN_WORKER_TIMEOUT_S)):
            if key in doc:
                seconds = check_seconds(doc[key], low, MAX_S)
                if seconds is None:
                    raise fail(key, f"expected a number of seconds between {low:g} and "
                                    f"{MAX_S:g}, got {_describe(doc[key])}")
                values[key] = seconds
        if "buffer_budget_mb" in doc:
            budget = doc["buffer_budget_mb"]
            if not _is_int_between(budget, 1, MAX_BUFFER_BUDGET_MB):
                raise fail("buffer_budget_mb", "expected an integer number of MiB between 1 and "
                                               f"{MAX_BUFFER_BUDGET_MB}, got {_describe(budget)}")
            values["buffer_budget_mb"] = budget
        for key in ("pidfile", "log_file", "user", "group"):
            if key in doc:
                if not isinstance(doc[key], str) or not doc[key]:
                    raise fail(key, f"expected a non-empty string, got {_describe(doc[key])}")
                values[key] = doc[key]
        return ServerConfig(**values)

    def admin(self, doc: Mapping[str, Any]) -> AdminConfig:
        def fail(key: Optional[str], expected: str) -> ConfigError:
            return self.fail("admin", key, expected, header="[admin]")

        for key in doc:
            if key not in self.ADMIN_KEYS:
                raise fail(key, "unknown key: expected one of " + ", ".join(self.ADMIN_KEYS))
        if not doc:
            return AdminConfig()
        if "bind" not in doc:
            raise fail("bind", "missing: expected \"host:port\" for the admin endpoint, "
                               "e.g. \"127.0.0.1:9901\"")
        try:
            # Port 0 (any free port, logged at start) is for tests and ad-hoc runs.
            return AdminConfig(bind=parse_endpoint(doc["bind"], allow_port_zero=True))
        except ValueError as exc:
            raise fail("bind", str(exc)) from None

    def listener(self, doc: Mapping[str, Any], index: int) -> ListenerConfig:
        bind_text = doc.get("bind")
        section = f"tcp_proxy[{index + 1}]"
        if isinstance(bind_text, str):
            section += f" (bind \"{bind_text}\")"

        def fail(key: Optional[str], expected: str) -> ConfigError:
            return self.fail(section, key, expected, header="[[tcp_proxy]]", occurrence=index)

        for key in doc:
            if key not in self.LISTENER_KEYS:
                raise fail(key, "unknown key: expected one of " + ", ".join(self.LISTENER_KEYS))
        if "bind" not in doc:
            raise fail("bind", "missing: expected \"host:port\" to listen on, "
                               "e.g. \"0.0.0.0:5432\"")
        try:
            bind = _usable(parse_endpoint(doc["bind"], allow_port_zero=True))
        except ValueError as exc:
            raise fail("bind", str(exc)) from None

        backends_doc = doc.get("backends")
        if backends_doc is None:
            raise fail("backends", "missing: expected a list of \"host:port\" strings")
        if not isinstance(backends_doc, list) or not backends_doc:
            raise fail("backends", "expected a non-empty list of \"host:port\" strings or "
                                   f"{{ address = \"host:port\", weight = N }} tables, "
                                   f"got {_describe(backends_doc)}")
        backends = tuple(self.backend(item, n, fail) for n, item in enumerate(backends_doc))

        timeout = doc.get("connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT_MS)
        if isinstance(timeout, bool) or not isinstance(timeout, int) \
                or not 1 <= timeout <= 3_600_000:
            raise fail("connect_timeout_ms", "expected an integer number of milliseconds "
                                             f"between 1 and 3600000, got {_describe(timeout)}")
        name = doc.get("name", "")
        if not isinstance(name, str):
            raise fail("name", f"expected a string, got {_describe(name)}")
        if all(b.backup for b in backends):
            raise fail("backends", "every backend is a backup: expected at least one primary "
                                   "(a backend without backup = true)")

        balance = doc.get("balance", "round_robin")
        if balance not in BALANCE_MODES:
            raise fail("balance", "expected one of " + ", ".join(f'"{m}"' for m in BALANCE_MODES)
                       + f", got {_describe(balance)}")
        retries = doc.get("retries")
        if retries is not None and not _is_int_between(retries, 0, 1000):
            raise fail("retries", "expected an integer between 0 and 1000 (other backends "
                                  f"tried after a failed connect), got {_describe(retries)}")
        budget = doc.get("connect_budget_ms")
        if budget is not None:
            if not _is_int_between(budget, 1, MAX_MS):
                raise fail("connect_budget_ms", "expected an integer number of milliseconds "
                                                f"between 1 and {MAX_MS}, got {_describe(budget)}")
            if budget < timeout:
                raise fail("connect_budget_ms", "expected at least connect_timeout_ms "
                                                f"({timeout}), got {budget}: the budget covers "
                                                "every attempt together")
        fall = doc.get("fall", DEFAULT_FALL)
        if not _is_int_between(fall, 0, 1000):
            raise fail("fall", "expected an integer between 0 and 1000 (consecutive connect "
                               f"failures that mark a backend down; 0: never), got "
                               f"{_describe(fall)}")
        fail_timeout = doc.get("fail_timeout_ms", DEFAULT_FAIL_TIMEOUT_MS)
        if not _is_int_between(fail_timeout, 1, MAX_MS):
            raise fail("fail_timeout_ms", "expected an integer number of milliseconds between 1 "
                                          f"and {MAX_MS}, got {_describe(fail_timeout)}")
        resolve_interval = doc.get("resolve_interval_ms", DEFAULT_RESOLVE_INTERVAL_MS)
        if not _is_int_between(resolve_interval, 100, MAX_MS):
            raise fail("resolve_interval_ms", "expected an integer number of milliseconds "
                                              f"between 100 and {MAX_MS}, got "
                                              f"{_describe(resolve_interval)}")
        reuse_port = doc.get("reuse_port", False)
        if not isinstance(reuse_port, bool):
            raise fail("reuse_port", f"expected true or false, got {_describe(reuse_port)}")
        health = None
        if "health_check" in doc:
            health = self.health_check(doc["health_check"], section, index)
        keepalive = self.keepalive(doc.get("tcp_keepalive", False), fail)
        return ListenerConfig(bind=bind, backends=backends, connect_timeout_ms=timeout, name=name,
                              balance=balance, retries=retries, connect_budget_ms=budget,
                              fall=fall, fail_timeout_ms=fail_timeout,
                              resolve_interval_ms=resolve_interval, health_check=health,
                              reuse_port=reuse_port, tcp_keepalive=keepalive)

    def keepalive(self, value: Any, fail: Any) -> Optional[Keepalive]:
        """``tcp_keepalive``: false (off), true (on, kernel timings) or a table of timings."""
        if isinstance(value, bool):
            return Keepalive() if value else None
        if not isinstance(value, dict):
            raise fail("tcp_keepalive", "expected true, false or a table like { idle_s = 600, "
                                        f"interval_s = 60, count = 5 }}, got {_describe(value)}")
        for key in value:
            if key not in self.KEEPALIVE_KEYS:
                raise fail("tcp_keepalive", f"unknown key \"{key}\": expected one of "
                                            + ", ".join(self.KEEPALIVE_KEYS))
        timings: dict[str, int] = {}
        for key, high in (("idle_s", MAX_KEEPALIVE_S), ("interval_s", MAX_KEEPALIVE_S),
                          ("count", MAX_KEEPALIVE_COUNT)):
            if key in value:
                if not _is_int_between(value[key], 1, high):
                    raise fail("tcp_keepalive", f"{key}: expected an integer between 1 and "
                                                f"{high}, got {_describe(value[key])}")
                timings[key] = value[key]
        return Keepalive(**timings)

    def health_check(self, doc: Any, section: str, index: int) -> HealthCheck:
        def fail(key: Optional[str], expected: str) -> ConfigError:
            return self.fail(section, key, expected, header="health_check", occurrence=index)

        if not isinstance(doc, dict):
            raise fail(None, "expected a table, e.g. [tcp_proxy.health_check] or "
                             f"health_check = {{ interval_ms = 2000 }}, got {_describe(doc)}")
        for key in doc:
            if key not in self.HEALTH_KEYS:
                raise fail(key, "unknown key: expected one of " + ", ".join(self.HEALTH_KEYS))
        defaults = HealthCheck()
        values: dict[str, Any] = {}
        for key, low, high, what in (("interval_ms", 10, MAX_MS, "milliseconds"),
                                     ("timeout_ms", 1, MAX_MS, "milliseconds"),
                                     ("rise", 1, 1000, "consecutive passes"),
                                     ("fall", 1, 1000, "consecutive failures")):
            value = doc.get(key, getattr(defaults, key))
            if key == "timeout_ms" and key not in doc:
                value = min(value, values["interval_ms"])  # a short interval implies a short probe
            if not _is_int_between(value, low, high):
                raise fail(key, f"expected an integer number of {what} between {low} and "
                                f"{high}, got {_describe(value)}")
            values[key] = value
        if values["timeout_ms"] > values["interval_ms"]:
            raise fail("timeout_ms", f"expected at most interval_ms ({values['interval_ms']}), "
                                     f"got {values['timeout_ms']}: a probe must end before "
                                     "the next one is due")
        for key in ("send", "expect"):
            if key in doc:
                if not isinstance(doc[key], str) or not doc[key]:
                    raise fail(key, "expected a non-empty string (TOML escapes such as \\r\\n "
                                    f"work), got {_describe(doc[key])}")
                values[key] = doc[key].encode("utf-8")
        return HealthCheck(**values)

    def backend(self, item: Any, position: int, fail: Any) -> Backend:
        where = f"backends[{position + 1}]"
        if isinstance(item, str):
            try:
                return Backend(_usable(parse_endpoint(item)))
            except ValueError as exc:
                raise fail("backends", f"{where}: {exc}") from None
        if not isinstance(item, dict):
            raise fail("backends", f"{where}: expected \"host:port\" or an inline table, "
                                   f"got {_describe(item)}")
        for key in item:
            if key not in self.BACKEND_KEYS:
                raise fail("backends", f"{where}: unknown key \"{key}\": expected one of "
                                       + ", ".join(self.BACKEND_KEYS))
        if "address" not in item:
            raise fail("backends", f"{where}: missing \"address\"")
        try:
            address = _usable(parse_endpoint(item["address"]))
        except ValueError as exc:
            raise fail("backends", f"{where}: address: {exc}") from None
        weight = item.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
            raise fail("backends", f"{where}: weight: expected an integer between 1 and 1000, "
                                   f"got {_describe(weight)}")
        backup = item.get("backup", False)
        if not isinstance(backup, bool):
            raise fail("backends", f"{where}: backup: expected true or false, "
                                   f"got {_describe(backup)}")
        return Backend(address, weight=weight, backup=backup)
