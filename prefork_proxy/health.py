"""Active health checks and DNS re-resolution, in one process beside the workers.

The master owns a ``HealthChecker`` (a handle; no thread, no blocking): it
forks the health-check process when the config needs one (a listener with a
``health_check`` table, or a backend given by hostname), restarts it when it
dies or when a reload changed the config, and stops it when the master stops.
The master calls ``tick`` from its loop at least once a second.  (Dead
workers' rows are the master's business, folded at reap: see ``rows``.)

The health-check process (``prefork-proxy: health``) is the one writer of:

- addresses of hostname backends: a resolver thread looks each name up
  every ``resolve_interval_ms`` (``getaddrinfo`` blocks, so never on a relay
  thread; each lookup in a thread of its own, so a slow name holds up no
  other); the main thread writes every address of the name into the name's
  slots, keeping an address in its slot (and its health) while it stays;
- active health: every ``interval_ms`` a probe connects to each address
  within ``timeout_ms``, optionally sends ``send`` and reads until the reply
  can be compared with ``expect``.  Probes run concurrently on one selector,
  so a hanging backend delays no other.  ``fall`` failures in a row mark a
  backend down, ``rise`` passes bring it up; a backend marked down by client
  failures (passive) is brought back by ``rise`` passes too.  Each change is
  logged once: ``backend db-2:5432 down: connect refused (3/3)``.

Workers only read what it writes (see ``shared.BackendTable``), so a check
never blocks the relay.  ``status.backend_rows`` reads the table for
``prefork-proxy status`` and ``/status``.

Principle (a name can fail, the resolver cannot): a lookup that fails in
any way (``gaierror``, ``UnicodeError``, anything else) only leaves that name
as it was, with one warning per new error; every other name keeps being
resolved.  Should the resolver thread die anyway, the main thread sees it
on its next turn (within ``MAX_WAIT_S``), logs it and starts a new one.

A DNS answer with more addresses than a name's ``ADDRESSES_PER_NAME`` slots
keeps ``select_addresses``: a subset chosen by rendezvous hashing with a
seed of this proxy instance (host name, boot id, master pid), so different
proxies send traffic to different subsets and an address that comes or goes
moves as few others as possible.  The truncation is logged once per change.

Test hook: ``PREFORK_PROXY_TEST_DNS`` (see ``fake_getaddrinfo``), read once
by ``prefork-proxy start`` (``install_test_dns``), replaces ``socket.getaddrinfo``
in the master and so in every process it forks: chosen names get fixed
addresses, after a delay, or an error.  It exists for the test suite; never
set it in production.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from prefork_proxy import children, faults, hygiene, logsetup
from prefork_proxy.admission.send_proxy import health_check_header
from prefork_proxy.balancer import backend_name
from prefork_proxy.config import HealthCheck, ListenerConfig
from prefork_proxy.proctitle import set_title
from prefork_proxy.shared import ADMIN_DRAIN, ADMIN_READY, BackendTable, PoolEntry, SharedState

log = logging.getLogger("prefork_proxy.health")

#: Wait before restarting a health-check process that died (it should not die).
RESTART_DELAY_S = 1.0
#: Longest wait between two attempts to fork the health-check process (fork keeps failing).
MAX_RESTART_DELAY_S = 30.0
#: The health-check process's longest sleep: it checks on its master this often.
MAX_WAIT_S = 0.5
#: Wait before starting another resolver thread after one died.
RESOLVER_RESTART_S = 1.0
#: The environment variable of the test hook (see ``fake_getaddrinfo``).
TEST_DNS_ENV = "PREFORK_PROXY_TEST_DNS"

AddressList = List[Tuple[int, tuple]]


def needs_process(shared: SharedState) -> bool:
    """Does the current config need a health-check process (checks, or names to resolve)?"""
    return any(listener.health_check is not None or any(not e.literal for e in entries)
               for _, listener, entries in shared.pools())


# --------------------------------------------------------------------------- master side


class HealthChecker:
    """The master's handle on the health-check process.  Called from the master's loop only."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        self.pid = 0
        self._config: object = None  # the config the running process serves
        self._restart_at = 0.0
        self._fork_failures = 0  # in a row: the retry backs off

    def tick(self) -> None:
        """Converge: a live process for the current config if it needs one."""
        now = time.monotonic()
        if self.pid and self.shared.config is not self._config:
            log.info("health checks: the config changed; restarting the health-check process")
            self.stop()
            # The old process may have written a verdict after ``reconfigure``
            # cleared the unchecked ones; now that it is gone, clear them for good.
            self.shared.clear_unchecked_verdicts()
        if self.pid and not self._alive():
            log.warning("health-check process %d died; restarting it in %.0f s", self.pid,
                        RESTART_DELAY_S)
            self.pid = 0
            self._restart_at = now + RESTART_DELAY_S
        if not self.pid and now >= self._restart_at and needs_process(self.shared):
            self._start()

    def stop(self) -> None:
        """Stop the process (bounded: SIGTERM, then SIGKILL after a second)."""
        if not self.pid:
            return
        pid, self.pid = self.pid, 0
        children.stop(pid, 1.0)

    def _alive(self) -> bool:
        try:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # the master's reap() collected it
            return False
        return done == 0

    def _start(self) -> None:
        self._config = self.shared.config
        master_pid = os.getpid()
        try:
            faults.trip("health.fork", OSError(errno.EAGAIN, "Resource temporarily unavailable "
                                               "(injected)"))
            pid = os.fork()
        except OSError as exc:  # EAGAIN under a process limit, ENOMEM: retry, keep serving
            self._fork_failures += 1
            delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (self._fork_failures - 1))
            self._restart_at = time.monotonic() + delay
            log.error("cannot fork the health-check process: %s; retrying in %.0f s",
                      exc.strerror or exc, delay)
            return
        self._fork_failures = 0
        if pid == 0:
            code = 1
            try:
                _CheckerProcess(self.shared, master_pid).run()
                code = 0
            except BaseException:
                log.exception("health-check process crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.pid = pid
        log.info("health-check process started: pid=%d", pid)


# --------------------------------------------------------------------------- the process


@dataclass
class _Streak:
    """What the checker remembers of one address between probes."""

    passes: int = 0
    failures: int = 0
    saw_passive: bool = False  # passes counted since clients' failures marked it down


@dataclass
class _Probe:
    """One check in flight: connect, then maybe send, then maybe read the reply."""

    slot: int
    name: str
    check: HealthCheck
    sock: socket.socket
    deadline: float
    phase: str = "connect"
    unsent: bytes = b""
    reply: bytearray = field(default_factory=bytearray)


class _CheckerProcess:
    """The health-check process's main thread (plus one resolver thread if names exist)."""

    def __init__(self, shared: SharedState, master_pid: int) -> None:
        self.shared = shared
        self.table: BackendTable = shared.table
        self.master_pid = master_pid
        self.selector = selectors.DefaultSelector()
        self.probes: Dict[int, _Probe] = {}
        self.due: Dict[int, float] = {}
        self.streaks: Dict[int, _Streak] = {}
        self.results: "queue.SimpleQueue[Tuple[int, object]]" = queue.SimpleQueue()
        self.stopping = threading.Event()
        self._plan_version = -1
        # Log paths that could not be reopened, with the (dev, inode) then seen there.
        self._unopenable: Dict[str, object] = {}
        self._cached_plan: Dict[int, Tuple[str, HealthCheck, bytes]] = {}
        self.getaddrinfo: Callable[..., Any] = socket.getaddrinfo  # the hook's, if installed
        self.seed = instance_seed(master_pid)
        self._names: List[Tuple[int, ListenerConfig, PoolEntry]] = []
        self._wake_w = -1
        self._resolver: Optional[threading.Thread] = None
        self._resolver_restart_at = 0.0
        self._last_error: Dict[PoolEntry, str] = {}  # per name: the error last warned of
        self._truncated: Dict[PoolEntry, Tuple[int, frozenset]] = {}  # ... the subset

    # -- setup

    def run(self) -> None:
        set_title("prefork-proxy: health")
        self._detach_from_master()
        if self.table.version[0] & 1:  # a predecessor was killed in the middle of a write
            self.table.version[0] += 1
        names = [(i, listener, entry) for i, (_, listener, entries)
                 in enumerate(self.shared.pools()) for entry in entries if not entry.literal]
        wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(wake_r, selectors.EVENT_READ, None)
        self._names = names
        self._watch_resolver()
        log.info("health-check process ready: %d address(es) to check, %d name(s) to resolve",
                 len(self._plan()), len(names))
        while os.getppid() == self.master_pid:
            self._turn(wake_r)
        self.stopping.set()

    def _watch_resolver(self) -> None:
        """Main thread, every turn: a resolver thread runs whenever there are names."""
        if not self._names or self.stopping.is_set():
            return
        thread = self._resolver
        if thread is not None and thread.is_alive():
            return
        now = time.monotonic()
        if thread is not None:
            if not self._resolver_restart_at:
                log.error("the resolver thread died; starting a new one in %.0f s",
                          RESOLVER_RESTART_S)
                self._resolver_restart_at = now + RESOLVER_RESTART_S
            if now < self._resolver_restart_at:
                return
        self._resolver_restart_at = 0.0
        self._resolver = threading.Thread(target=self._resolve_forever,
                                          args=(self._names, self._wake_w),
                                          name="resolver", daemon=True)
        self._resolver.start()

    def _detach_from_master(self) -> None:
        """Undo what fork copied from the master: its signal handlers, its listeners
        (``hygiene``; the master's death is also seen by the loop's ``getppid`` check)."""
        # A listening socket held here would outlive its removal by a reload.
        hygiene.detach_from_master(
            keep=(), ignore=hygiene.CHILD_IGNORED + (signal.SIGUSR1,),
            default=(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD))

    # -- the loop

    def _plan(self) -> Dict[int, Tuple[str, HealthCheck, bytes]]:
        """Every address to probe now: slot -> (name, check, first bytes); rebuilt when
        addresses change.  The first bytes are the PROXY header of a backend with
        ``send_proxy`` (v2 LOCAL / v1 UNKNOWN: the probe is the proxy's own
        connection, not a client's), so a backend that requires one does not
        refuse the probe nor log it as a client."""
        version = self.table.version[0]
        if self._plan_version == version:
            return self._cached_plan
        plan = {}
        for _, listener, entries in self.shared.pools():
            if listener.health_check is None:
                continue
            for entry in entries:
                version = listener.backend_send_proxy(entry.backend)
                first = health_check_header(version) if version else b""
                for slot in entry.slots:
                    address = self.table.address(slot)
                    if address is not None:
                        plan[slot] = (backend_name(entry.backend, address[1], entry.literal),
                                      listener.health_check, first)
        self._plan_version, self._cached_plan = version, plan
        return plan

    def _turn(self, wake_r: int) -> None:
        now = time.monotonic()
        plan = self._plan()
        for slot, (name, check, first) in plan.items():
            if slot not in self.probes and now >= self.due.get(slot, 0.0):
                self.due[slot] = now + check.interval_ms / 1000.0
                self._start_probe(slot, name, check, now, first)
        for slot in [s for s in self.due if s not in plan]:
            del self.due[slot]
            self.streaks.pop(slot, None)
        wait = min([MAX_WAIT_S] + [d - now for d in self.due.values()]
                   + [p.deadline - now for p in self.probes.values()])
        for key, events in self.selector.select(max(0.0, wait)):
            if key.data is None:
                self._apply_resolutions(wake_r)
            else:
                self._advance(key.data, events)
        now = time.monotonic()
        for probe in [p for p in self.probes.values() if p.deadline <= now]:
            what = "connect" if probe.phase == "connect" else "reply"
            self._finish(probe, False, f"{what} timed out after {probe.check.timeout_ms} ms")
        self._watch_resolver()
        self._follow_log_rotation()

    def _start_probe(self, slot: int, name: str, check: HealthCheck, now: float,
                     first: bytes = b"") -> None:
        address = self.table.address(slot)
        if address is None:
            return
        try:
            sock = socket.socket(address[0], socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: ours to fix, not the backend's fault
            log.warning("health check of %s skipped: cannot create a socket: %s", name, exc)
            return
        sock.setblocking(False)
        probe = _Probe(slot, name, check, sock, now + check.timeout_ms / 1000.0,
                       unsent=first + check.send)
        self.probes[slot] = probe
        code = sock.connect_ex(address[1])
        if code not in (0, errno.EINPROGRESS):
            self._finish(probe, False, _connect_reason(code))
            return
        self.selector.register(sock, selectors.EVENT_WRITE, probe)

    def _advance(self, probe: _Probe, events: int) -> None:
        sock, check = probe.sock, probe.check
        try:
            if probe.phase == "connect":
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self._finish(probe, False, _connect_reason(code))
                    return
                probe.phase = "send"
            if probe.phase == "send":
                if probe.unsent:
                    probe.unsent = probe.unsent[sock.send(probe.unsent):]
                    if probe.unsent:
                        return  # still writable-bound
                if not check.expect:
                    self._finish(probe, True, "")
                    return
                probe.phase = "read"
                self.selector.modify(sock, selectors.EVENT_READ, probe)
                return
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(probe, False, f"{probe.phase}: {exc.strerror or exc}")
            return
        expect = check.expect
        probe.reply += data
        if data and len(probe.reply) < len(expect) and expect.startswith(probe.reply):
            return  # a prefix so far: wait for the rest
        got = bytes(probe.reply[:len(expect)])
        if got == expect:
            self._finish(probe, True, "")
        elif not probe.reply:
            self._finish(probe, False, "closed without replying")
        else:
            self._finish(probe, False, f"reply {got!r} does not start with {expect!r}")

    def _finish(self, probe: _Probe, passed: bool, reason: str) -> None:
        self.probes.pop(probe.slot, None)
        try:
            self.selector.unregister(probe.sock)
        except (KeyError, ValueError):
            pass
        probe.sock.close()
        self._record(probe.slot, probe.name, probe.check, passed, reason)

    def _record(self, slot: int, name: str, check: HealthCheck, passed: bool,
                reason: str) -> None:
        """Count a probe's result; change the backend's state at rise/fall, logging it once."""
        table = self.table
        table.last_check[slot] = time.time()
        table.last_check_ok[slot] = int(passed)
        streak = self.streaks.setdefault(slot, _Streak())
        if table.passive_down[slot] and not streak.saw_passive:
            streak.saw_passive, streak.passes = True, 0  # count passes from the mark on
        elif not table.passive_down[slot]:
            streak.saw_passive = False
        if passed:
            streak.passes, streak.failures = streak.passes + 1, 0
            if streak.passes >= check.rise:
                if table.active_down[slot]:
                    table.active_down[slot] = 0
                    self._clear_passive(slot)
                    log.warning("backend %s up: health check passed (%d/%d)", name,
                                check.rise, check.rise)
                    if table.admin_state[slot] == ADMIN_DRAIN:
                        # A drain ends with the backend's comeback (drained, restarted,
                        # up again); a disable holds whatever checks say.
                        table.admin_state[slot] = ADMIN_READY
                        log.warning("backend %s: its drain ends: it went down and came back "
                                    "up", name)
                elif table.passive_down[slot]:
                    self._clear_passive(slot)
                    streak.saw_passive = False
                    log.warning("backend %s up: health check passed (%d/%d) since client "
                                "connects failed", name, check.rise, check.rise)
        else:
            streak.failures, streak.passes = streak.failures + 1, 0
            if streak.failures >= check.fall and not table.active_down[slot]:
                table.active_down[slot] = 1
                log.warning("backend %s down: %s (%d/%d)", name, reason, check.fall,
                            check.fall)

    def _clear_passive(self, slot: int) -> None:
        with self.table.lock:
            self.table.fails[slot] = self.table.passive_down[slot] = 0
            self.table.down_until[slot] = 0.0

    # -- names

    def _resolve_forever(self, names: List[Tuple[int, ListenerConfig, PoolEntry]],
                         wake_w: int) -> None:
        """Resolver thread: start each name's lookup on its listener's interval.

        Each lookup runs in a thread of its own (``_lookup_and_post``), at most
        one per name at a time, so a name whose DNS server takes seconds to
        answer delays no other name.  A failure of one lookup, of whatever
        type, is that name's result; if this thread dies anyway,
        ``_watch_resolver`` replaces it.
        """
        try:
            due = [0.0] * len(names)
            in_flight: set = set()  # positions with a lookup running (set ops hold the GIL)
            while not self.stopping.is_set():
                now = time.monotonic()
                for position, (_, listener, entry) in enumerate(names):
                    if now < due[position] or position in in_flight:
                        continue
                    due[position] = now + listener.resolve_interval_ms / 1000.0
                    in_flight.add(position)
                    self._start_lookup(position, entry, wake_w, in_flight)
                self.stopping.wait(max(0.05, min(due) - time.monotonic()))
        except BaseException:
            log.exception("the resolver thread crashed")
            raise

    def _start_lookup(self, position: int, entry: PoolEntry, wake_w: int, in_flight: set) -> None:
        threading.Thread(target=self._lookup_and_post, args=(position, entry, wake_w, in_flight),
                         name=f"lookup {entry.backend.address.host}", daemon=True).start()

    def _lookup_and_post(self, position: int, entry: PoolEntry, wake_w: int,
                         in_flight: set) -> None:
        """One lookup's thread: post its result and wake the main thread."""
        try:
            self.results.put((position, (entry, self._lookup(entry))))
            try:
                os.write(wake_w, b"\0")
            except BlockingIOError:
                pass
        finally:
            in_flight.discard(position)  # whatever happened, the name is looked up again

    def _lookup(self, entry: PoolEntry) -> object:
        """Every distinct address of one name, or the exception its lookup raised."""
        endpoint = entry.backend.address
        try:
            infos = self.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            unique: Dict[Tuple[int, str, int], Tuple[int, tuple]] = {}
            for family, _, _, _, sockaddr in infos:
                if family in (socket.AF_INET, socket.AF_INET6):
                    unique.setdefault(_address_key(family, sockaddr), (family, sockaddr))
            return list(unique.values())
        except Exception as exc:  # UnicodeError too: any failure is this name's alone
            return exc

    def _apply_resolutions(self, wake_r: int) -> None:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                _, (entry, result) = self.results.get_nowait()
            except queue.Empty:
                return
            try:
                self._apply_addresses(entry, result)
            except Exception:  # one name's trouble must not end the process
                log.exception("backend %s: cannot apply its addresses", entry.backend.address)

    def _apply_addresses(self, entry: PoolEntry, result: object) -> None:
        """Write a name's addresses into its slots: kept ones stay, new ones take free slots."""
        table = self.table
        label = str(entry.backend.address)
        if not isinstance(result, list):
            error = f"{type(result).__name__}: {result}" \
                if not isinstance(result, OSError) else str(result)
            if self._last_error.get(entry) != error:  # once per new error, not per lookup
                self._last_error[entry] = error
                kept = "; keeping its last addresses" \
                    if any(table.family[s] for s in entry.slots) else ""
                log.warning("backend %s: cannot resolve: %s%s", label, error, kept)
            return
        self._last_error.pop(entry, None)
        limit = len(entry.slots)
        chosen = select_addresses(label, result, limit, self.seed)
        if len(result) > limit:
            subset = (len(result), frozenset(_address_key(*a) for a in chosen))
            if self._truncated.get(entry) != subset:
                self._truncated[entry] = subset
                log.warning("backend %s resolves to %d addresses, more than the %d a name "
                            "may hold; this proxy uses a subset of %d (chosen per proxy "
                            "instance)", label, len(result), limit, limit)
        else:
            self._truncated.pop(entry, None)
        wanted = {_address_key(family, sockaddr): (family, sockaddr)
                  for family, sockaddr in chosen}
        current = {}
        for slot in entry.slots:
            address = table.address(slot)
            if address is not None:
                current[_address_key(*address)] = slot
        if current.keys() == wanted.keys():
            return
        table.begin_write()
        try:
            for key, slot in current.items():
                if key not in wanted:
                    table.clear_address(slot)
                    self.streaks.pop(slot, None)
            free = [s for s in entry.slots if not table.family[s]]
            for key, (family, sockaddr) in wanted.items():
                if key not in current:
                    slot = free.pop(0)
                    table.set_address(slot, family, sockaddr)
                    self.streaks.pop(slot, None)  # a new address starts its counts afresh
        finally:
            table.end_write()
        log.info("backend %s resolves to %s", label, ", ".join(key[1] for key in wanted))

    # -- logs

    def _follow_log_rotation(self) -> None:
        """Reopen a log file renamed by logrotate (the master signals workers, not us).

        A path that cannot be opened (it became a directory, the new file is
        not writable) is logged once to the old file, which stays in use.
        """
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, logging.FileHandler) or handler.stream is None:
                continue
            try:
                on_disk = os.stat(handler.baseFilename)
                is_open = os.fstat(handler.stream.fileno())
                same = (on_disk.st_dev, on_disk.st_ino) == (is_open.st_dev, is_open.st_ino)
                identity = (on_disk.st_dev, on_disk.st_ino)
            except OSError:
                same, identity = False, None
            if same or self._unopenable.get(handler.baseFilename, False) == identity:
                continue
            if logsetup.reopen_handler(handler):
                self._unopenable.pop(handler.baseFilename, None)
            else:  # tried again only once the path changes
                self._unopenable[handler.baseFilename] = identity


def _address_key(family: int, sockaddr: tuple) -> Tuple[int, str, int]:
    return family, sockaddr[0].split("%", 1)[0], sockaddr[1]


def _numeric_order(address: Tuple[int, tuple]) -> Tuple[int, int, int]:
    family, sockaddr = address
    return family, int(ipaddress.ip_address(sockaddr[0].split("%", 1)[0])), sockaddr[1]


def instance_seed(master_pid: int) -> bytes:
    """What tells this proxy instance from others: host name, boot id, master pid.

    Containers often all run their master as pid 1 on one host (one boot id),
    but each has its own host name; machines differ by boot id.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = b""
    return b"|".join((socket.gethostname().encode(), boot_id, str(master_pid).encode()))


def select_addresses(name: str, addresses: AddressList, limit: int, seed: bytes) -> AddressList:
    """The addresses a name's slots hold, sorted numerically: all of them up to ``limit``.

    Beyond ``limit``, the ``limit`` addresses with the highest rendezvous
    score for (``seed``, ``name``, address): another seed (another proxy)
    keeps another subset, and when one address comes or goes at most one
    kept address changes.
    """
    if len(addresses) > limit:
        def score(address: Tuple[int, tuple]) -> bytes:
            key = "|".join(map(str, _address_key(*address))).encode()
            return hashlib.blake2b(seed + b"|" + name.encode() + b"|" + key,
                                   digest_size=8).digest()
        addresses = sorted(addresses, key=score, reverse=True)[:limit]
    return sorted(addresses, key=_numeric_order)


def install_test_dns() -> None:
    """The test hook: with ``PREFORK_PROXY_TEST_DNS`` set, ``socket.getaddrinfo`` fakes names.

    Called once by ``prefork-proxy start`` before the master forks anything,
    so every process (workers too) sees the same fake answers.
    """
    spec = os.environ.get(TEST_DNS_ENV)
    if spec:
        socket.getaddrinfo = fake_getaddrinfo(spec)  # type: ignore[assignment]
        log.warning("%s is set: names it lists are answered by the test hook", TEST_DNS_ENV)


def fake_getaddrinfo(spec: str) -> Callable[..., Any]:
    """``getaddrinfo`` with chosen answers, for tests: the ``PREFORK_PROXY_TEST_DNS`` hook.

    ``spec`` is a JSON object: hostname -> ``{"delay_s": 4, "addresses":
    ["127.0.0.1", "::1"], "error": "UnicodeError"}`` (every key optional).
    Such a name sleeps ``delay_s`` (in the resolver thread, as a slow DNS
    server would make it), then raises the named error (``OSError``,
    ``UnicodeError``, ``RuntimeError``) or answers ``addresses``.  Other
    names go to the real ``getaddrinfo``.  A spec that is not valid JSON is
    ignored with a warning.
    """
    try:
        answers = json.loads(spec)
        if not isinstance(answers, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        log.warning("%s ignored: %s", TEST_DNS_ENV, exc)
        return socket.getaddrinfo
    real = socket.getaddrinfo
    errors = {"OSError": socket.gaierror, "UnicodeError": UnicodeError,
              "RuntimeError": RuntimeError}

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list:
        fake = answers.get(host)
        if not isinstance(fake, dict):
            return real(host, port, *args, **kwargs)
        time.sleep(float(fake.get("delay_s", 0)))
        if "error" in fake:
            raise errors.get(fake["error"], RuntimeError)(f"{fake['error']} for {host} "
                                                          f"(injected by {TEST_DNS_ENV})")
        infos = []
        for text in fake.get("addresses", []):
            if ipaddress.ip_address(text).version == 6:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, port)))
        return infos
    return getaddrinfo


def _connect_reason(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "connect refused"
    return f"connect failed: {os.strerror(code)}"
