"""A listener's pre-connect pipeline, and the per-connection state that runs it.

Who owns what.  ``compile_pipeline`` (or ``Pipeline(steps)``) runs once per
listener and config, in each worker at boot (``gate.listener_gate``); it
returns None for a listener with no admission keys, and the relay then pays
one ``is None`` test per accepted connection.  A ``Pipeline`` is immutable and
shared by every relay thread of a worker.  ``Pipeline.open`` makes one
``Admission`` per accepted connection; the connection's relay thread alone
drives it (it is not thread-safe, and needs not be), from accept until the
verdict, and calls ``release`` once more at close.

The relay's side, all of it (mechanical by design; nothing here touches a socket,
reads a clock other than at ``start``, or blocks)::

    adm = pipeline.open(peer, local)        # getpeername(), getsockname() values
    verdict = adm.start(now, first)         # first: one recv's bytes if adm.reads
                                            # (None: nothing there yet; b"": EOF)
    while verdict is a NeedMore:
        arm the timer at verdict.deadline if it differs from the one armed (None: none)
        on readable: data = client.recv(READ_SIZE); verdict = adm.feed(data)   # b"": EOF
        on the timer: verdict = adm.expire()                                   # a Reject
    Reject: close the client (RST if verdict.abort), log status/term/reason;
            adm.release() (a no-op here: a refusal already gave the token back)
    Accept: connect to verdict.route's pool (None: the listener's own backends),
            send send_proxy.proxy_header(...) if the backend wants one, then
            verdict.forward_prefix, then relay as usual; at close: adm.release()

Order of steps (``compile_pipeline``): PROXY header (it sets the client
address everything after it uses), access rules (a denied client takes no
limit token), limits (held while the ClientHello is awaited, so slow clients
count against their source), SNI (decides the route).  The deadline of a
reading step counts from accept (``proxy_timeout_ms``, ``sni_timeout_ms``:
each bounds the time from accept to its bytes being complete, as HAProxy's
``inspect-delay`` does), so the whole phase is bounded by the larger one.

Principle (split-invariant): the verdict depends on the bytes only, not on
how they were cut into ``feed`` calls, given the same end (EOF, deadline or
enough bytes): both parsers are split-invariant, a step that waits for a
length hint parses what is pending once more before a truncation or timeout
is declared, and the bytes after a PROXY header are handed on as they are.

Principle (exactly once): a limit token taken by a connection is given back
exactly once: at the refusal (any later step, the deadline, EOF), or by
``release`` at close; ``release`` after that is a no-op returning False.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

from prefork_proxy import acl as acl_module
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.proxy_protocol import ProxyHeader
from prefork_proxy.sni_routes import ServerNameTable

from .steps import AccessStep, ProxyHeaderStep, SniStep, SourceLimitStep, Step
from .verdicts import INTERNAL, Accept, Address, NeedMore, Reject, Verdict, Wait

log = logging.getLogger("prefork_proxy.admission")

#: Bytes a relay should read per ``recv`` while a pipeline waits: one maximal TLS
#: record plus its header (a whole ClientHello), more than any PROXY header we accept.
READ_SIZE = 16384 + 5


class Pipeline:
    """The compiled steps of one listener (in order); ``open`` one ``Admission`` per client."""

    __slots__ = ("steps", "reads", "_enters")

    def __init__(self, steps: Sequence[Step]) -> None:
        steps = tuple(steps)
        if not steps:
            raise ValueError("a pipeline needs at least one step (no steps: use None)")
        kinds = [type(step) for step in steps]
        if len(set(kinds)) != len(kinds):
            raise ValueError("each kind of step at most once per pipeline")
        if ProxyHeaderStep in kinds and kinds[0] is not ProxyHeaderStep:
            raise ValueError("the PROXY header step must come first: it sets the client address")
        self.steps = steps
        #: True when some step may wait for bytes (else ``start`` always decides).
        self.reads = any(step.reads for step in steps)
        # Each step's ``enter``, bound once for every connection.
        self._enters = tuple(step.enter for step in steps)

    def open(self, peer: Address, local: Address) -> "Admission":
        """The admission of one accepted connection; call ``start`` on it next."""
        return Admission(self.steps, peer, local, self.reads, self._enters)


class Admission:
    """One connection's way through a pipeline (see the module docstring for the calls).

    Readable by the relay and the access log at any time: ``client_address``
    and ``destination`` (what the PROXY header said, else the socket's),
    ``proxy_header``, ``server_name``, ``route``, ``received`` (every byte fed),
    ``consumed``, ``verdict`` (the latest answer) and ``deadline``.  ``reads``:
    some step may wait for bytes, so the relay reads once before ``start``
    and hands it what came (the common case, a PROXY header or ClientHello
    whole in the first segment, then decides in one call).
    """

    # No ``__slots__``: the fields most connections never set keep these class
    # defaults (an instance stores only what it sets), so ``__init__`` writes
    # eight fields, not twenty-two, once per connection.
    _index = 0
    _want = 0    # parse again once the buffer holds this many bytes
    _parsed = 0  # buffer length at the last parse
    consumed = 0
    received = 0
    accepted_at = 0.0
    deadline: Optional[float] = None
    verdict: Optional[Verdict] = None
    route: Optional[int] = None
    server_name: Optional[str] = None
    sni_error: Optional[str] = None  # why a client went to the default pool
    proxy_header: Optional[ProxyHeader] = None
    token = -1
    limits: Optional[ConnectionLimits] = None

    def __init__(self, steps: tuple, peer: Address, local: Address, reads: bool,
                 enters: tuple) -> None:
        self._steps = steps
        self._enters = enters  # the steps' bound ``enter``s (``Pipeline`` binds them once)
        self.reads = reads
        self.peer = peer
        self.local = local
        self.client_address: Address = peer[:2] if isinstance(peer, tuple) else peer
        self.destination: Address = local[:2] if isinstance(local, tuple) else local
        self.buffer = bytearray()

    # -- the relay's calls

    def start(self, now: Optional[float] = None, first: Optional[bytes] = None) -> Verdict:
        """The first verdict.  ``now``: ``time.monotonic()``; ``first``: bytes the relay
        read at accept (None: it read nothing; ``b""``: the client closed).

        The same verdict as ``start(now)`` followed by ``feed(first)``, in one call.
        """
        if self.verdict is not None:
            raise RuntimeError("Admission.start called twice")
        self.accepted_at = time.monotonic() if now is None else now
        if first:
            self.received = len(first)
            self.buffer += first
        verdict = self._advance()
        if first is not None and not first and type(verdict) is NeedMore:
            return self._end(truncated=True)
        return verdict

    def feed(self, data: bytes) -> Verdict:
        """Bytes just read from the client (``b""``: it closed); the new verdict."""
        if type(self.verdict) is not NeedMore:
            raise RuntimeError(f"Admission.feed after the verdict {self.verdict!r}")
        if not data:
            return self._end(truncated=True)
        self.received += len(data)
        buffer = self.buffer
        buffer += data
        if len(buffer) < self._want:
            return self.verdict
        return self._take()

    def expire(self) -> Verdict:
        """The deadline of ``NeedMore`` has passed: a ``Reject`` (no-op after a verdict)."""
        if type(self.verdict) is not NeedMore:
            return self.verdict  # type: ignore[return-value]
        return self._end(truncated=False)

    def retry(self) -> Verdict:
        """After a ``Wait`` (woken in its queue): the step that waited, once more."""
        if type(self.verdict) is not Wait:
            raise RuntimeError(f"Admission.retry after the verdict {self.verdict!r}")
        return self._advance()

    def release(self) -> bool:
        """At close: give back the limit token if still held.  True the one time it does."""
        token, self.token = self.token, -1
        if token < 0 or self.limits is None:
            return False
        try:
            return self.limits.release(token)
        except Exception:  # bookkeeping must never cost the relay its thread
            log.exception("releasing the connection limit of %r failed", self.client_address)
            return False

    # -- internals

    def _advance(self) -> Verdict:
        """Enter the next steps until one waits, refuses, or none is left."""
        enters = self._enters
        index = self._index
        try:
            for enter in enters[index:] if index else enters:
                result = enter(self)
                if result is not None:
                    self._index = index
                    return self._answer(result)
                index += 1
        except Exception as exc:
            self._index = index
            return self._refuse(self._internal(enters[index], exc))
        self._index = index
        buffer = self.buffer
        if buffer:
            prefix = bytes(buffer)
            buffer.clear()  # the admission lives on until close: keep no copy of the bytes
        else:
            prefix = b""
        self.verdict = verdict = Accept(self.route, self.client_address, self.destination,
                                        prefix, self.consumed, self.server_name)
        return verdict

    def _take(self) -> Verdict:
        step = self._steps[self._index]
        try:
            result = step.take(self)
        except Exception as exc:
            return self._refuse(self._internal(step.take, exc))
        if result is None:
            self._index += 1
            return self._advance()
        return self._answer(result)

    def _answer(self, result: object) -> Verdict:
        """A step's ``Reject`` or "n more bytes" as a verdict."""
        if type(result) is int:
            self._parsed = len(self.buffer)
            self._want = self._parsed + result
            verdict = self.verdict
            if type(verdict) is not NeedMore or verdict.deadline != self.deadline:
                self.verdict = verdict = NeedMore(self.deadline)
            return verdict
        if type(result) is Wait:  # the same step is entered again by ``retry``
            self.verdict = result  # type: ignore[assignment]
            return result  # type: ignore[return-value]
        return self._refuse(result)  # type: ignore[arg-type]

    def _end(self, truncated: bool) -> Verdict:
        """EOF or the deadline: parse what is pending once, then the step's refusal."""
        if len(self.buffer) > self._parsed:
            verdict = self._take()
            if type(verdict) is not NeedMore:
                return verdict
        step = self._steps[self._index]
        reject = self._call(step.truncated if truncated else step.timed_out)
        return self._refuse(reject)  # type: ignore[arg-type]

    def _refuse(self, reject: Reject) -> Reject:
        self.verdict = reject
        self.buffer = bytearray()
        self.release()
        return reject

    def _call(self, method: Callable[["Admission"], object]) -> object:
        """A step's call; an unexpected error refuses this connection only (500, ``IR``)."""
        try:
            return method(self)
        except Exception as exc:
            return self._internal(method, exc)

    def _internal(self, method: Callable[["Admission"], object], exc: Exception) -> Reject:
        """The refusal for an unexpected error in a step (logged with its traceback)."""
        log.error("admission step %s failed for client %r",
                  getattr(method, "__qualname__", method), self.client_address,
                  exc_info=exc)
        return Reject(INTERNAL, "IR", "internal_error", f"{type(exc).__name__}: {exc}")


def compile_pipeline(*, accept_proxy: Optional[str] = None,
                     trusted_proxies: Optional[Sequence[str]] = None,
                     proxy_timeout_ms: int = 3000,
                     allow: Optional[Sequence[str]] = None,
                     deny: Optional[Sequence[str]] = None,
                     limits: Optional[ConnectionLimits] = None, scope: int = 0,
                     max_connections: int = 0, max_connections_per_source: int = 0,
                     max_new_connections_per_source: int = 0,
                     routes: Optional[ServerNameTable] = None, has_default_route: bool = True,
                     sni_timeout_ms: int = 3000,
                     listener_queue: Optional[object] = None) -> Optional[Pipeline]:
    """A listener's pipeline from its keys (issue 12 and 13 names), or None if it has none.

    ``limits`` is the master's ``ConnectionLimits`` and ``scope`` the listener's
    slot in it; it is needed when any of the three limits is set.  ``routes`` is
    the listener's ``ServerNameTable`` (None: no SNI routing); ``has_default_route``
    whether the listener has backends of its own.  ``listener_queue``: where a
    client that lost a race between workers for the listener's last
    ``max_connections`` slot waits (``Wait``); None: it is refused.  CIDR lists are validated
    by the config loader (``acl.cidr_errors``); a bad one here is a ValueError.
    """
    steps: list = []
    if accept_proxy:
        trusted = acl_module.compile_acl(trusted_proxies, None) if trusted_proxies else None
        steps.append(ProxyHeaderStep(accept_proxy, trusted, proxy_timeout_ms))
    rules = acl_module.compile_acl(allow, deny)
    if rules is not None:
        steps.append(AccessStep(rules))
    if max_connections or max_connections_per_source or max_new_connections_per_source:
        if limits is None:
            raise ValueError("connection limits are set but no ConnectionLimits was given")
        steps.append(SourceLimitStep(limits, scope, max_connections,
                                     max_connections_per_source,
                                     max_new_connections_per_source, listener_queue))
    if routes is not None:
        steps.append(SniStep(routes, has_default_route, sni_timeout_ms))
    return Pipeline(steps) if steps else None
