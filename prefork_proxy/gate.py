"""The admission glue: a listener's config -> its pre-connect pipeline and its ``choose``.

Who owns what.  ``admission`` is pure and knows nothing of the config, the
balancer or the relay; the relay knows nothing of admission but its calls
(``RelayLoop.submit(..., admission=, choose=)``).  This module joins them:

- the master calls ``connection_limits(config)`` before the first fork (one
  shared ``limits.ConnectionLimits`` for every listener with a limit key,
  None when no listener has one), and keeps it across reloads (see
  ``Master`` for the reshaping rule);
- a worker calls ``listener_gate(listener, balancer, limits, scope)`` once per
  listener at boot: None when the listener sets no admission key (the
  accept path then stays exactly as it was: one ``is None`` test per
  client), else a ``Gate`` holding the compiled ``Pipeline`` and the
  ``choose`` callable;
- per accepted client, on the accepting relay thread, ``Gate.open(peer,
  local)``; ``Gate.choose(verdict)`` runs later on the client's relay thread,
  once the verdict is an ``Accept``.

``choose`` asks the listener's balancer for targets with the *client address*
(from the PROXY header when one was accepted: what ``source_hash`` hashes),
and, when a backend wants ``send_proxy``, gives each of its targets the header
to send first (``Target.send_prefix``), built per backend so a failover to a
backend with another version sends the right one.  A listener with SNI routes
(issue 13's ``[[tcp_proxy.routes]]``) gets an SNI step (its ``ServerNameTable``)
and one balancer per route: ``verdict.route`` picks the route's pool (None:
the listener's own backends), each pool with its own ``PoolChoice``.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Sequence, Tuple

from prefork_proxy.admission import (
    Accept,
    Admission,
    Pipeline,
    Reject,
    compile_pipeline,
    proxy_header,
)
from prefork_proxy.admission.verdicts import OVER_LIMIT
from prefork_proxy.backend_queue import LISTENER_WAIT_S, BackendQueue
from prefork_proxy.balancer import BACKEND_SCOPE_BASE, Balancer
from prefork_proxy.config import MAX_BACKEND_ADDRESSES, Config, ListenerConfig
from prefork_proxy.limits import LEDGER_PER_ROW, ConnectionLimits
from prefork_proxy.relay import RelayLoop, Target
from prefork_proxy.sni_routes import ServerNameTable

log = logging.getLogger("prefork_proxy.gate")

#: Entries of the shared per-source table (fixed at creation: shared memory does not
#: grow after fork).  Pages are touched only as sources arrive.
MAX_SOURCES = 65536


def has_admission(listener: ListenerConfig) -> bool:
    """Whether ``listener`` sets any key of the pre-connect phase."""
    return bool(listener.accept_proxy or listener.allow or listener.deny or listener.has_limits
                or listener.send_proxy or any(b.send_proxy for b in listener.backends)
                or listener.routes)


def relay_supports_admission() -> bool:
    """Whether this relay has the pre-connect phase (``submit(..., admission=, choose=)``)."""
    code = RelayLoop.submit.__code__
    return "admission" in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


def sources_for(config: Config) -> int:
    """How many per-source entries the config can need: bounded by ``MAX_SOURCES``.

    A listener with ``max_connections`` cannot hold more distinct sources than
    that; one without is bounded only by ``MAX_SOURCES``.
    """
    total = 0
    for listener in config.listeners:
        if listener.max_connections_per_source or listener.max_new_connections_per_source:
            total += listener.max_connections or MAX_SOURCES
    return max(1, min(MAX_SOURCES, total))


def source_shares(config: Config, capacity: int) -> Dict[int, int]:
    """Listener index -> the live sources it may hold in a table of ``capacity`` entries.

    Only listeners with a per-source limit and no ``max_connections`` get one:
    ``max_connections`` already bounds a listener's live sources (each holds a
    connection), while one without it could take the whole table, and then a
    new source of every other listener would be refused.  Each such listener
    gets an equal part of the table, one per listener with a per-source limit
    (``capacity // n``, at least 1).
    """
    limited = [index for index, listener in enumerate(config.listeners)
               if listener.max_connections_per_source
               or listener.max_new_connections_per_source]
    share = max(1, capacity // max(1, len(limited)))
    return {index: share for index in limited
            if not config.listeners[index].max_connections}


def connection_limits(config: Config) -> Optional[ConnectionLimits]:
    """Master, before fork: the shared limits for ``config``, or None if nothing is limited.

    Scopes: one per listener slot, then one per backend address slot
    (``balancer.BACKEND_SCOPE_BASE + slot``, for backends' ``max_connections``),
    so a reload that adds a backend limit later finds its scopes already there.
    """
    if not any(listener.has_limits or listener.has_backend_limits
               or any(route.has_backend_limits for route in listener.route_pools())
               for listener in config.listeners):
        return None
    return ConnectionLimits(sources=sources_for(config),
                            scopes=BACKEND_SCOPE_BASE + MAX_BACKEND_ADDRESSES,
                            ledger=LEDGER_PER_ROW)


class PassStep:
    """A step that admits everyone: the pipeline of a listener with only ``send_proxy``.

    The relay's pre-connect path is what sends ``Target.send_prefix``; this
    step gives it an ``Accept`` at once (no byte read), with the endpoints.
    """

    reads = False
    __slots__ = ()

    def enter(self, adm: Admission) -> None:
        return None


class _PrefixedTarget(Target):
    """A ``Target`` carrying ``send_prefix`` (only while the relay's Target has no such slot)."""

    __slots__ = ("send_prefix",)


_TARGET = Target if "send_prefix" in getattr(Target, "__slots__", ()) else _PrefixedTarget


def with_prefix(target: Target, prefix: bytes) -> Target:
    """A copy of ``target`` that sends ``prefix`` to the backend first."""
    copy = _TARGET(target.family, target.sockaddr, target.name, target.timeout_s,
                   target.report)
    copy.slot = target.slot
    copy.send_prefix = prefix  # type: ignore[attr-defined]
    return copy


class PoolChoice:
    """One pool's backend choice behind a gate: its balancer and its PROXY header versions.

    The pool is the listener's own or one of its SNI routes' (``balancer.listener``
    is then a ``config.RoutePool``, whose ``backend_send_proxy`` falls back on the
    route's ``send_proxy``, then the listener's).
    """

    __slots__ = ("balancer", "_spec", "_versions", "_uniform", "_members", "_by_address")

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        spec = self._spec = balancer.listener
        versions = {spec.backend_send_proxy(b) for b in spec.backends}
        self._versions = versions - {None}
        # One version for every backend (None: no header for any; "": they differ).
        self._uniform: Optional[str] = next(iter(versions)) if len(versions) == 1 else ""
        self._members: object = None
        self._by_address: Dict[tuple, Optional[str]] = {}

    def targets(self, verdict: Accept) -> Iterator[Target]:
        client = verdict.client_address
        targets = self.balancer.targets(client if isinstance(client, tuple) else None)
        if not self._versions:
            return targets
        if self._uniform:
            # Every backend wants the same header: one for the connection (the
            # relay sends ``send_first`` to whichever backend connects), no
            # Target copied per attempt.
            verdict.send_first = proxy_header(self._uniform, client, verdict.destination)
            return targets
        return self._prefixed(targets, client, verdict.destination)

    def _prefixed(self, targets: Iterator[Target], client: object,
                  destination: object) -> Iterator[Target]:
        headers: Dict[str, bytes] = {}
        for target in targets:
            version = self._version_of(target)  # only pools whose backends differ come here
            if target.sockaddr is None or not version:
                yield target  # a pause, or a backend that wants no header
                continue
            header = headers.get(version)
            if header is None:
                header = headers[version] = proxy_header(version, client, destination)
            yield with_prefix(target, header)

    def _version_of(self, target: Target) -> Optional[str]:
        """The send_proxy version of the backend behind ``target`` (by its address)."""
        members = self.balancer.members()
        if members is not self._members:
            self._by_address = {m.target.sockaddr: self._spec.backend_send_proxy(m.backend)
                                for m in members if m.target is not None}
            self._members = members
        return self._by_address.get(target.sockaddr)


class Gate:
    """One listener's pipeline and backend choice, in one worker (see the module docstring).

    ``balancer`` is the listener's own pool's; ``routes`` one balancer per SNI
    route, in config order (an ``Accept``'s ``route`` indexes them).
    """

    __slots__ = ("listener", "pipeline", "balancer", "_default", "_routes", "open", "choose")

    def __init__(self, listener: ListenerConfig, pipeline: Pipeline,
                 balancer: Balancer, routes: Sequence[Balancer] = ()) -> None:
        self.listener, self.pipeline, self.balancer = listener, pipeline, balancer
        #: Accepting relay thread: ``open(peer, local)``, the admission of one client:
        #: the pipeline's own ``open`` (no call in between, once per client).
        self.open = pipeline.open
        # No backends of its own: the SNI step refuses whom no route takes, so the
        # default pool is never asked.
        self._default = PoolChoice(balancer) if listener.backends else None
        self._routes = tuple(PoolChoice(b) for b in routes)
        #: The client's relay thread, on ``Accept``: ``choose(verdict)``, the targets of
        #: its pool in order.  Without SNI routes every verdict goes to the default
        #: pool: its own ``targets``, with no call in between (once per client).
        self.choose = self._choose if self._routes or self._default is None else \
            self._default.targets

    def _choose(self, verdict: Accept) -> Iterator[Target]:
        """``choose`` of a listener with SNI routes: the pool of ``verdict.route``."""
        route = verdict.route
        pool = self._default if route is None else self._routes[route]
        if pool is None:  # not reached: the SNI step refuses these
            return iter(())
        return pool.targets(verdict)


def listener_gate(listener: ListenerConfig, balancer: Balancer,
                  limits: Optional[ConnectionLimits], scope: int,
                  routes: Sequence[Balancer] = ()) -> Optional[Gate]:
    """Worker boot: the listener's ``Gate``, or None when it sets no admission key.

    ``routes``: a balancer per ``listener.route_pools()`` entry, in order.
    """
    if not has_admission(listener):
        return None
    if len(routes) != len(listener.routes):
        raise ValueError(f"listener {listener.label}: {len(listener.routes)} routes, "
                         f"{len(routes)} balancers")
    table = None
    if listener.routes:  # validated by the config loader: this cannot raise
        table = ServerNameTable([r.server_names for r in listener.routes],
                                [r.alpn for r in listener.routes])
    queue = None
    if listener.max_connections and limits is not None:
        queue = listener_queue(listener, limits, scope)
    pipeline = compile_pipeline(
        accept_proxy=listener.accept_proxy, trusted_proxies=listener.trusted_proxies,
        proxy_timeout_ms=listener.proxy_timeout_ms, allow=listener.allow, deny=listener.deny,
        limits=limits if listener.has_limits else None, scope=scope,
        max_connections=listener.max_connections,
        max_connections_per_source=listener.max_connections_per_source,
        max_new_connections_per_source=listener.max_new_connections_per_source,
        listener_queue=queue, routes=table, has_default_route=bool(listener.backends),
        sni_timeout_ms=listener.sni_timeout_ms)
    if pipeline is None:  # send_proxy alone: the Accept (with its addresses) comes at once
        pipeline = Pipeline([PassStep()])
    return Gate(listener, pipeline, balancer, routes)


def listener_queue(listener: ListenerConfig, limits: ConnectionLimits,
                   scope: int) -> BackendQueue:
    """Where a client that lost the race for the listener's last slot waits (one per
    worker and listener): a slot is free when the shared count is below the limit."""
    counts, limit = limits.scope_count, listener.max_connections
    timeout_s = max(LISTENER_WAIT_S, listener.queue_timeout_ms / 1000.0)
    return BackendQueue(
        listener.label, timeout_s, lambda: counts[scope] < limit,
        timed_out=Reject(OVER_LIMIT, "PR", "max_connections",
                         f"no listener slot within {timeout_s * 1000:.0f} ms"))


__all__: Tuple[str, ...] = ("Gate", "connection_limits", "has_admission", "listener_gate",
                            "listener_queue", "relay_supports_admission", "source_shares",
                            "sources_for",
                            "with_prefix")
