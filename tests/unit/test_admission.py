"""The pre-connect pipeline (prefork_proxy.admission): steps alone and together, pure logic.

Streams are fed split at every point (and byte by byte): the verdict must not
depend on the cut.  Limits use a real ``ConnectionLimits`` (shared memory, one
process) with a counting ``release``, so "exactly once" is checked on the
real object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_proxy import proxy_protocol as pp
from prefork_proxy.acl import compile_acl
from prefork_proxy.admission import (
    REASONS,
    Accept,
    AccessStep,
    NeedMore,
    Pipeline,
    ProxyHeaderStep,
    Reject,
    SniStep,
    SourceLimitStep,
    compile_pipeline,
    health_check_header,
    proxy_header,
)
from prefork_proxy.limits import ConnectionLimits
from prefork_proxy.sni_routes import ServerNameTable

DATA = Path(__file__).resolve().parent.parent / "data" / "client_hello"
PEER = ("127.0.0.1", 40000)
LOCAL = ("127.0.0.1", 443)
CLIENT = ("192.0.2.10", 51234)
ORIGINAL_DST = ("198.51.100.1", 443)
NOW = 1000.0


def hello(name: str) -> bytes:
    return bytes.fromhex((DATA / f"{name}.hex").read_text().replace("\n", ""))


A_TEST = hello("openssl_tls13_sni")          # SNI a.test
NO_SNI = hello("openssl_tls13_nosni")
ALPN_PG = hello("openssl_tls12_alpn")        # SNI db.internal, ALPN postgresql
TWO_RECORDS = hello("derived_two_records")   # a.test, hello spread over 2 records
V2 = pp.encode_v2(CLIENT, ORIGINAL_DST)
V1 = pp.encode_v1(CLIENT, ORIGINAL_DST)
ROUTES = ServerNameTable([["b.test"], ["a.test", "*.a.test"], ["db.internal"]],
                         [None, None, ["postgresql"]])


class CountingLimits(ConnectionLimits):
    """A real ConnectionLimits that counts the calls of ``release`` and their successes."""

    def __init__(self) -> None:
        super().__init__(sources=64, scopes=4, rows=4, ledger=64)
        self.calls = 0
        self.released = 0

    def release(self, token: int) -> bool:
        self.calls += 1
        done = super().release(token)
        self.released += done
        return done


@pytest.fixture
def limits() -> CountingLimits:
    return CountingLimits()


def run(pipeline: Pipeline, chunks: Iterable[bytes], end: Optional[str] = "eof",
        peer=PEER, local=LOCAL, at_start: bool = False):
    """Feed ``chunks`` until a verdict; then ``end`` ("eof", "expire" or None).

    ``at_start``: the first chunk goes to ``start`` itself, as the relay hands
    it the bytes of its read at accept (``Admission.reads``).  Returns the
    verdict and the admission; ``adm.rest`` (a test attribute kept
    in ``REST``) is what was never fed: bytes the relay would relay itself.
    """
    adm = pipeline.open(peer, local)
    chunks = list(chunks)
    fed = 0
    if at_start and chunks:
        verdict = adm.start(NOW, chunks[0])
        fed = 1
    else:
        verdict = adm.start(NOW)
    for chunk in chunks[fed:]:
        if not isinstance(verdict, NeedMore):
            break
        verdict = adm.feed(chunk)
        fed += 1
    REST[id(adm)] = b"".join(chunks[fed:])
    if isinstance(verdict, NeedMore) and end == "eof":
        verdict = adm.feed(b"")
    elif isinstance(verdict, NeedMore) and end == "expire":
        verdict = adm.expire()
    return verdict, adm


#: id(admission) -> the bytes ``run`` did not feed it (the relay's after an Accept).
REST: dict = {}


def backend_sees(verdict, adm) -> tuple:
    """A verdict as the backend would experience it: an Accept's prefix plus the later bytes."""
    if isinstance(verdict, Accept):
        return (Accept, verdict.route, verdict.client_address, verdict.destination,
                verdict.forward_prefix + REST.pop(id(adm), b""), verdict.consumed,
                verdict.server_name)
    return (Reject, verdict.status, verdict.term, verdict.reason)


def splits(stream: bytes) -> List[List[bytes]]:
    """Every way to cut ``stream`` in two, and byte by byte."""
    cuts = [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    return [[stream]] + cuts + [[stream[i:i + 1] for i in range(len(stream))]]


def same_for_every_split(pipeline: Pipeline, stream: bytes, end: str = "eof"):
    whole, adm = run(pipeline, [stream], end)
    expected = backend_sees(whole, adm)
    for chunks in splits(stream):
        for at_start in (False, True):  # fed after start, or the first piece given to start
            verdict, other = run(pipeline, chunks, end, at_start=at_start)
            rest = len(REST.get(id(other), b""))
            assert backend_sees(verdict, other) == expected, (chunks, at_start, verdict, whole)
            if isinstance(whole, Accept):
                assert other.received + rest == len(stream)
                assert other.received == verdict.consumed + len(verdict.forward_prefix)
    return whole, adm


@pytest.mark.parametrize("first", [None, b""], ids=["nothing_read", "eof_at_accept"])
def test_start_with_what_the_accept_read_is_start_then_feed(first) -> None:
    """``start(now, None)`` (the read found nothing) waits as ``start(now)`` does;
    ``start(now, b"")`` (the client closed before a byte) is ``feed(b"")``'s refusal."""
    pipeline = compile_pipeline(accept_proxy="v2")
    adm = pipeline.open(PEER, LOCAL)
    verdict = adm.start(NOW, first)
    reference = pipeline.open(PEER, LOCAL)
    expected = reference.start(NOW)
    if first is not None:
        expected = reference.feed(first)
    assert type(verdict) is type(expected)
    if isinstance(expected, Reject):
        assert (verdict.reason, verdict.term) == (expected.reason, expected.term) == \
            ("proxy_truncated", "CR")
    else:
        assert verdict.deadline == expected.deadline == NOW + 3.0


# --------------------------------------------------------------------------- compile

def test_a_listener_without_admission_keys_compiles_to_none() -> None:
    assert compile_pipeline() is None
    assert compile_pipeline(allow=[], deny=None, trusted_proxies=["10.0.0.0/8"]) is None


def test_compile_orders_the_steps(limits: CountingLimits) -> None:
    pipeline = compile_pipeline(accept_proxy="any", allow=["0.0.0.0/0"], limits=limits,
                                max_connections_per_source=2, routes=ROUTES)
    assert [type(s) for s in pipeline.steps] == [ProxyHeaderStep, AccessStep, SourceLimitStep,
                                                 SniStep]
    assert pipeline.reads
    with pytest.raises(ValueError):
        compile_pipeline(max_connections=5)  # limits but no ConnectionLimits
    with pytest.raises(ValueError):
        Pipeline([AccessStep(compile_acl(["10.0.0.0/8"], None)), ProxyHeaderStep()])
    with pytest.raises(ValueError):
        Pipeline([])


def test_address_only_steps_decide_at_start_without_a_byte(limits: CountingLimits) -> None:
    pipeline = compile_pipeline(allow=["127.0.0.0/8"], limits=limits, max_connections=10)
    assert not pipeline.reads
    adm = pipeline.open(PEER, LOCAL)
    assert adm.start(NOW) == Accept(None, PEER, LOCAL, b"", 0)
    assert adm.release() and not adm.release()


# --------------------------------------------------------------------------- PROXY header

@pytest.mark.parametrize("version,header", [("v2", V2), ("v1", V1), ("any", V2), ("any", V1)])
def test_proxy_header_and_tls_hello_in_one_stream_split_anywhere(version: str,
                                                                 header: bytes) -> None:
    pipeline = compile_pipeline(accept_proxy=version, routes=ROUTES)
    verdict, adm = same_for_every_split(pipeline, header + A_TEST + b"early data")
    assert verdict == Accept(1, CLIENT, ORIGINAL_DST, A_TEST + b"early data", len(header),
                             "a.test")
    assert adm.proxy_header.client == CLIENT


def test_proxy_header_alone_forwards_exactly_the_bytes_after_it() -> None:
    pipeline = compile_pipeline(accept_proxy="v2")
    stream = V2 + b"\r\n\r\nPROXY-looking payload"
    verdict, _ = same_for_every_split(pipeline, stream)
    assert verdict.forward_prefix == b"\r\n\r\nPROXY-looking payload"
    assert verdict.consumed == len(V2) and verdict.client_address == CLIENT
    # Header only: the stream after it is empty, and Accept comes with the last header byte.
    verdict, adm = run(pipeline, [V2[:-1], V2[-1:]], end=None)
    assert verdict == Accept(None, CLIENT, ORIGINAL_DST, b"", len(V2))


@pytest.mark.parametrize("header", [pp.encode_v2_local(), b"PROXY UNKNOWN\r\n",
                                    pp.encode_v2("/tmp/a.sock", "/tmp/b.sock"),
                                    pp.encode_v2(None, None)])
def test_local_unknown_unix_unspec_keep_the_real_endpoints(header: bytes) -> None:
    verdict, _ = same_for_every_split(compile_pipeline(accept_proxy="any"), header + b"x")
    assert verdict == Accept(None, PEER, LOCAL, b"x", len(header))


def test_untrusted_source_is_a_direct_client_and_its_proxy_looking_bytes_are_untouched(
        ) -> None:
    stream = V1 + A_TEST
    only_proxy = compile_pipeline(accept_proxy="any", trusted_proxies=["10.0.0.0/8"])
    adm = only_proxy.open(PEER, LOCAL)
    assert adm.start(NOW) == Accept(None, PEER, LOCAL, b"", 0)  # nothing read at all
    # Trusted: the same bytes are a header.
    trusted = run(only_proxy, [stream], peer=("10.9.9.9", 1))[0]
    assert trusted.client_address == CLIENT
    # With an SNI step after it, every byte reaches the SNI step (which refuses non-TLS).
    with_sni = compile_pipeline(accept_proxy="any", trusted_proxies=["10.0.0.0/8"],
                                routes=ROUTES, has_default_route=True)
    verdict, adm = run(with_sni, [stream])
    assert verdict == Reject(400, "CR", "sni_not_tls")
    assert adm.sni_error == "not_tls"
    unix = run(only_proxy, [stream], peer="")[0]  # a unix peer has no IP: untrusted
    assert unix == Accept(None, "", LOCAL, b"", 0)


def test_a_proxy_header_is_required_from_trusted_sources() -> None:
    pipeline = compile_pipeline(accept_proxy="v2")
    verdict, _ = run(pipeline, [A_TEST])
    assert verdict == Reject(400, "CR", "proxy_bad_signature")


MUST_REJECT_PROXY = [
    ("v2", b"GET / HTTP/1.1\r\n\r\n", "proxy_bad_signature"),
    ("v2", V1, "proxy_version_not_allowed"),
    ("v1", V2, "proxy_version_not_allowed"),
    ("any", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "proxy_bad_line_ending"),
    ("any", b"PROXY TCP4 " + b"1" * 120, "proxy_v1_too_long"),
    ("any", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_bad_family"),
    ("any", b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "proxy_bad_address"),
    ("any", V2[:12] + b"\x31" + V2[13:], "proxy_bad_version"),
    ("any", V2[:14] + b"\x10\x01" + b"\x00" * 64, "proxy_v2_too_long"),  # 4097 > 4096
    ("any", V2[:20], "proxy_truncated"),      # the client closes mid-header
    ("any", b"PROXY TCP4 1.2", "proxy_truncated"),
]


@pytest.mark.parametrize("version,stream,reason", MUST_REJECT_PROXY)
def test_must_reject_proxy_headers_split_anywhere(version: str, stream: bytes,
                                                  reason: str) -> None:
    pipeline = compile_pipeline(accept_proxy=version, routes=ROUTES)
    verdict, adm = same_for_every_split(pipeline, stream)
    assert (verdict.status, verdict.term, verdict.reason) == (400, "CR", reason)
    assert verdict.abort and reason in REASONS
    assert adm.buffer == b""  # nothing kept after the verdict


# --------------------------------------------------------------------------- access rules

def test_access_rules_judge_the_header_address_not_the_peer() -> None:
    pipeline = compile_pipeline(accept_proxy="v2", deny=["192.0.2.10/32"])
    verdict, _ = same_for_every_split(pipeline, V2 + b"data")
    assert verdict == Reject(403, "PR", "denied") and verdict.abort
    other = pp.encode_v2(("192.0.2.11", 1), ORIGINAL_DST)
    assert isinstance(run(pipeline, [other + b"data"])[0], Accept)


@pytest.mark.parametrize("peer,expected", [
    (("192.0.2.7", 1), None),
    (("::ffff:192.0.2.7", 1, 0, 0), None),          # IPv4-mapped matches an IPv4 rule
    (("192.0.2.66", 1), "denied"),                  # deny is checked first
    (("198.51.100.7", 1), "not_allowed"),
    (("2001:db8::1", 1, 0, 0), "not_allowed"),
    ("", "bad_address"),                            # a unix peer has no IP: fails closed
])
def test_access_step(peer, expected: Optional[str]) -> None:
    pipeline = compile_pipeline(allow=["192.0.2.0/24"], deny=["192.0.2.66/32"])
    verdict = pipeline.open(peer, LOCAL).start(NOW)
    if expected is None:
        assert verdict == Accept(None, peer[:2], LOCAL, b"", 0)
    else:
        assert verdict == Reject(403, "PR", expected) and verdict.abort


# --------------------------------------------------------------------------- limits

def test_per_source_limit_refuses_the_next_and_frees_one_at_release(
        limits: CountingLimits) -> None:
    pipeline = compile_pipeline(limits=limits, max_connections_per_source=2)
    held = [pipeline.open(PEER, LOCAL) for _ in range(3)]
    verdicts = [adm.start(NOW) for adm in held]
    assert [type(v) for v in verdicts] == [Accept, Accept, Reject]
    assert verdicts[2] == Reject(503, "PR", "max_connections_per_source")
    assert limits.source_connections(0, PEER[0]) == 2
    assert held[0].release()
    assert isinstance(pipeline.open(PEER, LOCAL).start(NOW), Accept)
    other = pipeline.open(("127.0.0.2", 1), LOCAL).start(NOW)
    assert isinstance(other, Accept)  # another source has its own count


def test_the_rate_and_listener_limits_and_a_full_table(limits: CountingLimits) -> None:
    rate = compile_pipeline(limits=limits, scope=1, max_new_connections_per_source=1)
    assert isinstance(rate.open(PEER, LOCAL).start(NOW), Accept)
    assert rate.open(PEER, LOCAL).start(NOW) == Reject(503, "PR",
                                                       "max_new_connections_per_source")
    listener = compile_pipeline(limits=limits, scope=2, max_connections=1)
    first = listener.open(PEER, LOCAL)
    assert isinstance(first.start(NOW), Accept)
    assert listener.open(("10.0.0.1", 1), LOCAL).start(NOW) == Reject(503, "PR",
                                                                        "max_connections")
    assert listener.open("", LOCAL).start(NOW) == Reject(503, "PR", "max_connections")
    first.release()
    assert isinstance(listener.open("", LOCAL).start(NOW), Accept)  # unix: listener count only
    small = ConnectionLimits(sources=1, scopes=1, rows=2, ledger=8)
    table = compile_pipeline(limits=small, max_connections_per_source=5)
    assert isinstance(table.open(("10.0.0.1", 1), LOCAL).start(NOW), Accept)
    full = table.open(("10.0.0.2", 1), LOCAL).start(NOW)
    assert full == Reject(503, "RR", "source_table_full") and full.abort


def _limited(limits: CountingLimits, **keys) -> Pipeline:
    return compile_pipeline(accept_proxy="v2", limits=limits, max_connections_per_source=5,
                            max_connections=100, routes=ROUTES, **keys)


PATHS = {
    # name: (stream, end, expected verdict type)
    "accept then close": (V2 + A_TEST, None, Accept),
    "refused by SNI (no route, no default)": (V2 + hello("openssl_tls13_alpn"), None, Reject),
    "refused by SNI (not TLS)": (V2 + b"GET / HTTP/1.0\r\n\r\n", None, Reject),
    "client closes mid-hello": (V2 + A_TEST[:100], "eof", Reject),
    "hello deadline": (V2 + A_TEST[:100], "expire", Reject),
    "header deadline": (V2[:10], "expire", Reject),
    "bad header": (b"\r\n\r\n\x00\r\nQUIX\n", None, Reject),
    "access denied before the limit": (pp.encode_v2(("192.0.2.66", 1), ORIGINAL_DST), None,
                                       Reject),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_a_limit_token_is_given_back_exactly_once_on_every_path(limits: CountingLimits,
                                                                name: str) -> None:
    stream, end, kind = PATHS[name]
    pipeline = _limited(limits, has_default_route=False, deny=["192.0.2.66/32"])
    verdict, adm = run(pipeline, [stream], end)
    assert type(verdict) is kind, verdict
    if kind is Accept:
        assert limits.connections(0) == 1 and limits.released == 0
    else:  # a refusal gives the token back at once, before the relay's close
        assert limits.connections(0) == 0 and adm.token == -1
    # The relay's close: release once, and again by mistake.
    adm.release()
    adm.release()
    assert adm.expire() is verdict  # a stale timer after the verdict changes nothing
    assert limits.connections(0) == 0
    assert limits.source_connections(0, CLIENT[0]) == 0
    took = name not in ("header deadline", "bad header", "access denied before the limit")
    assert limits.released == int(took)
    assert limits.calls == int(took)  # never a second call into limits.release


def test_an_internal_error_in_a_later_step_refuses_and_still_releases(
        limits: CountingLimits) -> None:
    class Broken:
        reads = False

        def enter(self, adm):
            raise KeyError("boom")

    pipeline = Pipeline([SourceLimitStep(limits, 0, 10), Broken()])  # type: ignore[list-item]
    adm = pipeline.open(PEER, LOCAL)
    verdict = adm.start(NOW)
    assert verdict == Reject(500, "IR", "internal_error") and "boom" in verdict.detail
    assert limits.released == 1 and not adm.release() and limits.connections(0) == 0


# --------------------------------------------------------------------------- SNI

@pytest.mark.parametrize("stream,route,name", [
    (A_TEST, 1, "a.test"),
    (TWO_RECORDS, 1, "a.test"),
    (ALPN_PG, 2, "db.internal"),
    (hello("openssl_tls12_sni"), 1, "a.test"),
    (hello("curl_default"), None, "c.test"),        # no route: the default pool
    (NO_SNI, None, None),
])
def test_sni_routes_and_forwards_every_byte_read(stream: bytes, route, name) -> None:
    pipeline = compile_pipeline(routes=ROUTES, has_default_route=True)
    verdict, _ = same_for_every_split(pipeline, stream + b"\x17\x03\x03")
    assert verdict == Accept(route, PEER, LOCAL, stream + b"\x17\x03\x03", 0, name)


MUST_REJECT_SNI = [
    (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 400, "CR", "sni_not_tls"),
    (b"\x80\x2e\x01\x03\x01", 400, "CR", "sni_sslv2"),
    (b"\x16\x03\x01\x00\x00rest", 400, "CR", "sni_bad_record"),
    (A_TEST[:5] + b"\x02" + A_TEST[6:], 400, "CR", "sni_bad_handshake"),
    (b"\x16\x03\x01\x40\x01", 400, "CR", "sni_too_large"),
    (A_TEST[:-1], 400, "CR", "sni_truncated"),
    (NO_SNI, 403, "PR", "sni_no_server_name"),
    (hello("curl_default"), 403, "PR", "sni_no_route"),
]


@pytest.mark.parametrize("stream,status,term,reason", MUST_REJECT_SNI)
def test_must_reject_hellos_without_a_default_pool(stream: bytes, status: int, term: str,
                                                   reason: str) -> None:
    pipeline = compile_pipeline(routes=ROUTES, has_default_route=False)
    verdict, _ = same_for_every_split(pipeline, stream)
    assert verdict == Reject(status, term, reason) and verdict.abort and reason in REASONS


@pytest.mark.parametrize("stream,status,term,reason", MUST_REJECT_SNI[:6])
def test_with_a_default_pool_bad_tls_is_still_refused_with_400(stream: bytes, status: int,
                                                               term: str, reason: str) -> None:
    # Issue 13: only valid ClientHellos (without SNI, or naming no route) go to the
    # default pool; a plain-text client is refused, not handed to a TLS backend.
    pipeline = compile_pipeline(routes=ROUTES, has_default_route=True)
    verdict, _ = same_for_every_split(pipeline, stream)
    assert verdict == Reject(status, term, reason) and status == 400


def test_a_refusal_for_want_of_a_route_carries_the_server_name() -> None:
    pipeline = compile_pipeline(routes=ROUTES, has_default_route=False)
    verdict, _ = run(pipeline, [hello("curl_default")])
    assert verdict.reason == "sni_no_route" and verdict.server_name == "c.test"


# --------------------------------------------------------------------------- deadlines

def test_deadlines_count_from_accept_and_move_once_the_header_is_in() -> None:
    pipeline = compile_pipeline(accept_proxy="v2", proxy_timeout_ms=3000, routes=ROUTES,
                                sni_timeout_ms=5000)
    adm = pipeline.open(PEER, LOCAL)
    first = adm.start(NOW)
    assert first.deadline == NOW + 3.0
    assert adm.feed(V2[:3]) is first  # same deadline: the same object, nothing to re-arm
    second = adm.feed(V2[3:] + A_TEST[:10])
    assert isinstance(second, NeedMore) and second.deadline == NOW + 5.0
    verdict = adm.expire()
    assert verdict == Reject(400, "cR", "sni_timeout") and not verdict.abort
    with pytest.raises(RuntimeError):
        adm.feed(b"more")


def test_header_timeout_and_no_timeout() -> None:
    verdict, _ = run(compile_pipeline(accept_proxy="any"), [b"PROXY TCP4 "], "expire")
    assert verdict == Reject(400, "cR", "proxy_timeout") and not verdict.abort
    verdict, _ = run(compile_pipeline(accept_proxy="any"), [], "expire")
    assert verdict == Reject(400, "cR", "proxy_timeout")
    forever = compile_pipeline(accept_proxy="any", proxy_timeout_ms=0).open(PEER, LOCAL)
    assert forever.start(NOW).deadline is None


def test_at_the_deadline_pending_bytes_are_judged_before_the_timeout() -> None:
    # 7 bytes: a record header claiming an empty record.  Fed 1 + 6, the second feed is
    # below the reader's length hint (not parsed yet): the deadline still sees the error.
    pipeline = compile_pipeline(routes=ROUTES, has_default_route=False)
    verdict, _ = run(pipeline, [b"\x16", b"\x03\x01\x00\x00\x01\x00"], "expire")
    assert verdict == Reject(400, "CR", "sni_bad_record")


# --------------------------------------------------------------------------- property

@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(V2) + len(A_TEST)), max_size=8),
       st.sampled_from([V1, V2]))
def test_any_number_of_cuts_gives_the_same_accept(cuts: List[int], header: bytes) -> None:
    stream = header + A_TEST + b"tail"
    points = sorted(set(c for c in cuts if c < len(stream)))
    chunks = [stream[a:b] for a, b in zip([0] + points, points + [len(stream)]) if b > a]
    pipeline = compile_pipeline(accept_proxy="any", allow=["192.0.2.0/24"], routes=ROUTES)
    verdict, adm = run(pipeline, chunks)
    rest = len(REST.get(id(adm), b""))
    assert backend_sees(verdict, adm) == (Accept, 1, CLIENT, ORIGINAL_DST, A_TEST + b"tail",
                                          len(header), "a.test")
    assert adm.received == verdict.consumed + len(verdict.forward_prefix) == len(stream) - rest


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=50))
def test_random_bytes_never_raise(stream: bytes, piece: int) -> None:
    pipeline = compile_pipeline(accept_proxy="any", routes=ROUTES, has_default_route=False)
    chunks = [stream[i:i + piece] for i in range(0, len(stream), piece)]
    verdict, _ = run(pipeline, chunks)
    assert isinstance(verdict, (Accept, Reject))
    if isinstance(verdict, Reject):
        assert verdict.reason in REASONS and verdict.status in (400, 403)


# --------------------------------------------------------------------------- send_proxy

@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("client,destination", [
    (CLIENT, ORIGINAL_DST),
    (("2001:db8::5", 7, 0, 0), ("2001:db8::1", 443, 0, 0)),
    (("2001:db8::5", 7, 0, 0), ("192.0.2.1", 443)),   # mixed: both sent as IPv6
])
def test_send_proxy_carries_the_client_address(version: str, client, destination) -> None:
    header = proxy_header(version, client, destination)
    parsed = pp.parse(header + b"payload", version)
    assert parsed.length == len(header) and parsed.client[1] == client[1]
    assert parsed.client[0].endswith(client[0].split("%")[0])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("client,destination", [
    (CLIENT, ORIGINAL_DST),
    (("192.0.2.9", 1, 0, 0), ("192.0.2.1", 25)),         # longer tuples: two items count
    (("2001:db8::5", 7, 0, 0), ("2001:db8::1", 443, 0, 0)),
    (("2001:db8::5", 7, 0, 0), ("192.0.2.1", 443)),
    ("", "/run/x.sock"), (None, ORIGINAL_DST), (CLIENT, None),
])
def test_proxy_header_reads_two_items_of_an_address_and_needs_no_slice(version: str, client,
                                                                        destination) -> None:
    """proxy_header passes a socket's address as it is (a 4-tuple for IPv6): the same
    bytes as the encoders give for its (ip, port), and LOCAL/UNKNOWN without two IPs."""
    if isinstance(client, tuple) and isinstance(destination, tuple):
        pair = (client[:2], destination[:2])
        expected = pp.encode_v2(*pair) if version == "v2" else pp.encode_v1(*pair)
    else:
        expected = pp.encode_v2_local() if version == "v2" else b"PROXY UNKNOWN\r\n"
    assert proxy_header(version, client, destination) == expected


def test_send_proxy_for_a_unix_client_and_the_health_check() -> None:
    assert proxy_header("v1", "", "/run/x.sock") == b"PROXY UNKNOWN\r\n"
    # v2 from a unix client: LOCAL (no addresses; the receiver uses the real ends).
    unix = pp.parse(proxy_header("v2", "", "/run/x.sock"))
    assert (unix.command, unix.family, unix.client) == ("LOCAL", "UNSPEC", None)
    assert proxy_header("v2", "", "/run/x.sock") == health_check_header("v2")
    local = pp.parse(health_check_header("v2"))
    assert (local.command, local.client) == ("LOCAL", None)
    assert pp.parse(health_check_header("v1")).family == "UNKNOWN"
    with pytest.raises(ValueError):
        proxy_header("v3", CLIENT, ORIGINAL_DST)
    # What a pipeline accepted goes straight into the encoder.
    accept = run(compile_pipeline(accept_proxy="v2"), [V2 + b"x"])[0]
    assert proxy_header("v2", accept.client_address, accept.destination) == V2


def test_every_reason_label_is_known() -> None:
    # Metrics labels must be a closed set: everything a step can say is in REASONS.
    assert all(r in REASONS for r in ("proxy_timeout", "proxy_truncated", "sni_timeout",
                                      "sni_truncated", "denied", "max_connections",
                                      "source_table_full", "internal_error"))
    assert json.dumps(sorted(REASONS))  # plain strings


def test_a_source_beyond_its_listeners_share_is_refused_as_a_resource_run_out() -> None:
    limits = ConnectionLimits(sources=16, rows=2)
    limits.set_shares({4: 1}, range(8))
    pipeline = compile_pipeline(limits=limits, scope=4, max_connections_per_source=3)
    assert pipeline is not None
    first = pipeline.open(("192.0.2.1", 1000), ORIGINAL_DST)
    assert isinstance(first.start(0.0), Accept)
    refused = pipeline.open(("192.0.2.2", 1000), ORIGINAL_DST).start(0.0)
    assert refused == Reject(503, "RR", "source_share_full") and refused.abort
    assert "source_share_full" in REASONS
    assert first.release()
