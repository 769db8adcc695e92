"""The idle sweep's logic (relay/idle.py), over stand-in connections: pure, no sockets."""
from __future__ import annotations

from types import SimpleNamespace

from prefork_proxy.relay.idle import IdleSweep, interval_for


class _Conn(SimpleNamespace):
    __hash__ = object.__hash__  # a set member, as a Connection is


def _conn():
    up = SimpleNamespace(nread=0, nwritten=0, pending=0)
    down = SimpleNamespace(nread=0, nwritten=0, pending=0)
    return _Conn(upstream=up, downstream=down)


def test_interval_is_a_tenth_of_the_idle_value_at_most_a_second():
    assert interval_for(1.5) == 0.15
    assert interval_for(60.0) == 1.0


def test_closed_only_once_unchanged_for_the_idle_value_never_earlier():
    sweep = IdleSweep(1.0)
    conn = _conn()
    sweep.add(conn, 0.0)
    assert sweep.sweep(0.5) == []
    assert sweep.sweep(0.99) == []         # 0.99 s since the counts were taken
    assert sweep.sweep(1.0) == [(conn, "cD")]  # nothing ever moved: waiting for the client


def test_a_request_read_while_connecting_and_no_answer_is_sd():
    sweep = IdleSweep(1.0)
    conn = _conn()
    conn.upstream.nread = conn.upstream.nwritten = 7
    sweep.add(conn, 0.0)
    assert sweep.sweep(1.0) == [(conn, "sD")]


def test_a_moving_counter_restarts_the_clock():
    sweep = IdleSweep(1.0)
    conn = _conn()
    sweep.add(conn, 0.0)
    for step in range(1, 30):
        conn.downstream.nread += 1
        conn.downstream.nwritten += 1
        assert sweep.sweep(step * 0.1) == []


def test_term_sd_when_the_client_spoke_last_cd_when_the_server_did():
    sweep = IdleSweep(1.0)
    asked, answered = _conn(), _conn()
    sweep.add(asked, 0.0)
    sweep.add(answered, 0.0)
    sweep.sweep(0.1)
    asked.upstream.nread = asked.upstream.nwritten = 10       # a request, no answer
    answered.upstream.nread = answered.upstream.nwritten = 10
    sweep.sweep(0.2)
    answered.downstream.nread = answered.downstream.nwritten = 50  # the answer
    sweep.sweep(0.3)
    assert dict(sweep.sweep(1.25)) == {asked: "sD"}
    assert dict(sweep.sweep(1.35)) == {asked: "sD", answered: "cD"}


def test_held_bytes_name_the_side_that_does_not_read():
    sweep = IdleSweep(1.0)
    conn = _conn()
    sweep.add(conn, 0.0)
    conn.downstream.nread, conn.downstream.pending = 100, 100  # the client reads nothing
    sweep.sweep(0.1)
    assert sweep.sweep(1.2) == [(conn, "cD")]
    conn.downstream.pending, conn.upstream.pending = 0, 5
    assert sweep.sweep(1.3) == [(conn, "sD")]


def test_a_request_and_its_answer_within_one_interval_is_cd():
    """Both counters moved between two sweeps: the server spoke last (the docstring's rule;
    CI saw an echoed request closed as sD when the old code let the client's side win)."""
    sweep = IdleSweep(1.0)
    conn = _conn()
    sweep.add(conn, 0.0)
    conn.upstream.nread = conn.upstream.nwritten = 5
    conn.downstream.nread = conn.downstream.nwritten = 5
    assert sweep.sweep(0.1) == []
    assert sweep.sweep(1.1) == [(conn, "cD")]
