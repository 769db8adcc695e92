"""The admin endpoint's HTTP layer: the request-head parser (tables, split points, properties)
and the server over real loopback sockets (routes, errors, hostile clients, deadlines)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_proxy.admin.httphead import BadRequest, Request, parse_request_head

LIMIT = 8192


def _parse(data: bytes, limit: int = LIMIT):
    """The parser's answer as a comparable value: None, a Request, or ("error", reason)."""
    try:
        return parse_request_head(data, limit)
    except BadRequest as exc:
        return ("error", exc.reason)


# --- the parser: valid heads ------------------------------------------------------------

VALID = [
    # (bytes, method, path, query, version, headers)
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/", "", (1, 1), (("host", "x"),)),
    (b"GET /metrics HTTP/1.0\r\n\r\n", "GET", "/metrics", "", (1, 0), ()),
    (b"HEAD /status?format=json&x= HTTP/1.1\r\nHost: 127.0.0.1:9901\r\n\r\n",
     "HEAD", "/status", "format=json&x=", (1, 1), (("host", "127.0.0.1:9901"),)),
    # Bare LF line ends are tolerated (documented); mixed with CRLF too.
    (b"GET /live HTTP/1.0\n\n", "GET", "/live", "", (1, 0), ()),
    (b"GET /live HTTP/1.1\nHost: h\r\nAccept: */*\n\r\n", "GET", "/live", "", (1, 1),
     (("host", "h"), ("accept", "*/*"))),
    # Names are case-insensitive (lowered), values trimmed of SP/HTAB, inner blanks kept.
    (b"GET / HTTP/1.1\r\nHOST:h\r\nUser-Agent: \t curl/8.0  x \t\r\nX-Empty:\r\n\r\n",
     "GET", "/", "", (1, 1), (("host", "h"), ("user-agent", "curl/8.0  x"), ("x-empty", ""))),
    # obs-text in a value is allowed (latin-1), as RFC 9110 5.5 says.
    (b"GET / HTTP/1.0\r\nX-T: caf\xe9\r\n\r\n", "GET", "/", "", (1, 0), (("x-t", "caf\xe9"),)),
    # absolute-form and asterisk-form targets.
    (b"GET http://127.0.0.1:9901/ready?a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
     "GET", "/ready", "a", (1, 1), (("host", "127.0.0.1"),)),
    (b"GET http://h HTTP/1.0\r\n\r\n", "GET", "/", "", (1, 0), ()),
    (b"OPTIONS * HTTP/1.0\r\n\r\n", "OPTIONS", "*", "", (1, 0), ()),
    # Any method token parses (the server answers 405); HTTP/1.9 is still 1.x.
    (b"PURGE /x HTTP/1.9\r\nHost: a\r\n\r\n", "PURGE", "/x", "", (1, 9), (("host", "a"),)),
]


@pytest.mark.parametrize("data,method,path,query,version,headers", VALID)
def test_a_valid_head_parses_and_every_strict_prefix_needs_more(data, method, path, query,
                                                                 version, headers):
    body = b"trailing body or pipelined bytes"
    request = parse_request_head(data + body, LIMIT)
    assert isinstance(request, Request)
    assert (request.method, request.path, request.query, request.version, request.headers) == \
        (method, path, query, version, headers)
    assert request.head_length == len(data)
    # Every split point: the prefix needs more, the whole gives the same answer.
    for cut in range(len(data)):
        assert parse_request_head(data[:cut], LIMIT) is None, data[:cut]
    assert parse_request_head(data, LIMIT) == request
    # A limit equal to the head's length is enough; one byte less is too small.
    assert parse_request_head(data, len(data)) == request
    assert _parse(data, len(data) - 1) == ("error", "too_large")


def test_header_lookup_is_case_insensitive_and_gives_the_first():
    request = parse_request_head(b"GET / HTTP/1.0\r\nA: 1\r\na: 2\r\n\r\n")
    assert request.header("A") == "1" and request.header("b") is None


# --- the parser: what it must reject ------------------------------------------------------

MUST_REJECT = [
    # request line
    (b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", "bad_request_line"),   # leading empty line
    (b"GET  / HTTP/1.0\r\n\r\n", "bad_request_line"),                 # two spaces
    (b"GET / HTTP/1.0 \r\n\r\n", "bad_request_line"),                 # trailing space
    (b"GET /\tx HTTP/1.0\r\n\r\n", "bad_request_line"),               # tab in target
    (b"GET / x HTTP/1.0\r\n\r\n", "bad_request_line"),                # space in target
    (b"GET /\x00 HTTP/1.0\r\n\r\n", "bad_request_line"),              # NUL in target
    (b"GET /caf\xe9 HTTP/1.0\r\n\r\n", "bad_request_line"),           # non-ASCII target
    (b"GET /#frag HTTP/1.0\r\n\r\n", "bad_request_line"),             # fragment
    (b"GET metrics HTTP/1.0\r\n\r\n", "bad_request_line"),            # no slash
    (b"G\xc3T / HTTP/1.0\r\n\r\n", "bad_request_line"),               # method not a token
    (b"GET(/ / HTTP/1.0\r\n\r\n", "bad_request_line"),                # '(' not a tchar
    (b"GET /\r\n\r\n", "bad_request_line"),                           # HTTP/0.9 form
    (b"GET / http/1.1\r\nHost: h\r\n\r\n", "bad_request_line"),       # version is case-sensitive
    (b"GET / HTTP/1.1\r\r\nHost: h\r\n\r\n", "bad_request_line"),     # bare CR
    (b"GET / HTTP/1.1\rHost: h\r\n\r\n", "bad_request_line"),         # bare CR as a line end
    (b"GET / HTTP/1\r\n\r\n", "bad_request_line"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", "bad_request_line"),  # TLS hello
    (b"SSH-2.0-OpenSSH_9.6\r\n", "bad_request_line"),                 # refused on line one
    # version
    (b"GET / HTTP/2.0\r\n\r\n", "bad_version"),
    (b"GET / HTTP/0.9\r\n\r\n", "bad_version"),
    (b"GET / HTTP/1.10\r\n\r\n", "bad_version"),
    (b"GET / HTTP/11.1\r\n\r\n", "bad_version"),
    # header fields
    (b"GET / HTTP/1.0\r\nHost : h\r\n\r\n", "bad_header"),            # space before colon
    (b"GET / HTTP/1.0\r\nHost\t: h\r\n\r\n", "bad_header"),
    (b"GET / HTTP/1.0\r\n: h\r\n\r\n", "bad_header"),                 # empty name
    (b"GET / HTTP/1.0\r\nNoColon\r\n\r\n", "bad_header"),
    (b"GET / HTTP/1.0\r\nA: 1\r\n folded\r\n\r\n", "bad_header"),     # obs-fold
    (b"GET / HTTP/1.0\r\n\tX: 1\r\n\r\n", "bad_header"),
    (b"GET / HTTP/1.0\r\nA: x\x00y\r\n\r\n", "bad_header"),           # NUL in value
    (b"GET / HTTP/1.0\r\nA: x\ry\r\n\r\n", "bad_header"),             # bare CR in value
    (b"GET / HTTP/1.0\r\nA: x\x7fy\r\n\r\n", "bad_header"),           # DEL in value
    (b"GET / HTTP/1.0\r\nA: 1\r\r\n\r\n", "bad_header"),              # CR CR LF
    (b"GET / HTTP/1.0\r\nX\xff: 1\r\n\r\n", "bad_header"),            # non-token name
    # Host rules of HTTP/1.1
    (b"GET / HTTP/1.1\r\n\r\n", "bad_host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "bad_host"),
    # bounds
    (b"GET / HTTP/1.0\r\n" + b"A: 1\r\n" * 101 + b"\r\n", "too_many_headers"),
    (b"GET /" + b"a" * LIMIT + b" HTTP/1.0\r\n\r\n", "too_large"),
    (b"GET / HTTP/1.0\r\nA: " + b"a" * LIMIT + b"\r\n\r\n", "too_large"),
    (b"GET / HTTP/1.0\r\n" + b"A: 1\r\n" * 2000, "too_large"),   # lines but no end of head
    (b"\x00" * LIMIT, "too_large"),
]


@pytest.mark.parametrize("data,reason", MUST_REJECT)
def test_a_bad_head_is_rejected_with_its_reason_and_prefixes_agree(data, reason):
    assert _parse(data) == ("error", reason)
    # Every prefix either needs more or already gives the same reason (never another one).
    for cut in range(0, len(data), max(1, len(data) // 200)):
        assert _parse(data[:cut]) in (None, ("error", reason)), data[:cut]


def test_too_large_is_decided_as_soon_as_the_buffer_reaches_the_limit():
    start = b"GET / HTTP/1.0\r\nA: "
    assert _parse(start + b"a" * (100 - len(start) - 1), 100) is None
    assert _parse(start + b"a" * (100 - len(start)), 100) == ("error", "too_large")
    # 1 MiB of header is refused by looking at the first ``limit`` bytes only.
    huge = start + b"a" * (1 << 20)
    began = time.perf_counter()
    for _ in range(100):
        assert _parse(huge) == ("error", "too_large")
    assert time.perf_counter() - began < 0.5


def test_garbage_fails_on_its_first_line_not_at_the_limit():
    assert _parse(b"\x16\x03\x01\n") == ("error", "bad_request_line")
    assert _parse(b"GET / HTTP/1.1\r\n") is None


# --- the parser: properties ---------------------------------------------------------------

_VALID_HEADS = [case[0] for case in VALID]
# No example database: the tests leave nothing behind in the tree.
FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _check_consistent(data: bytes, limit: int) -> None:
    """The module's own error only, and every prefix: need more or the whole's answer."""
    whole = _parse(data, limit)
    if isinstance(whole, Request):
        assert whole.head_length <= limit
        assert data[:whole.head_length].endswith(b"\n")
    for cut in range(len(data)):
        assert _parse(data[:cut], limit) in (None, whole)


@FAST
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=400))
def test_random_bytes_give_need_more_a_request_or_the_modules_error(data, limit):
    _check_consistent(data, limit)


_ALPHABET = b"\r\n :\t/?#GETHOST1.\x00\xff"


@st.composite
def _mutated(draw) -> bytes:
    """A valid head with bytes replaced, inserted or deleted, mostly from HTTP's own bytes."""
    data = bytearray(draw(st.sampled_from(_VALID_HEADS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        byte = draw(st.one_of(st.sampled_from(list(_ALPHABET)), st.integers(0, 255)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "insert" or at == len(data):
            data[at:at] = bytes([byte])
        elif action == "replace":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


@FAST
@given(_mutated(), st.sampled_from([16, 40, 64, LIMIT]))
def test_mutations_of_valid_heads_never_raise_anything_else(data, limit):
    _check_consistent(data, limit)


@settings(FAST, max_examples=100)
@given(st.lists(st.tuples(st.from_regex(rb"\A[A-Za-z0-9-]{1,20}\Z"),
                          st.from_regex(rb"\A[\x21-\x7e]([ \x21-\x7e]{0,30}[\x21-\x7e])?\Z")),
                max_size=8),
       st.from_regex(rb"\A/[A-Za-z0-9/._-]{0,30}\Z"))
def test_generated_valid_heads_round_trip(fields, path):
    head = b"GET " + path + b" HTTP/1.0\r\n" + b"".join(
        name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n"
    request = parse_request_head(head + b"rest", LIMIT)
    assert request is not None and request.head_length == len(head)
    assert request.path == path.decode()
    assert request.headers == tuple((n.decode().lower(), v.decode("latin-1")) for n, v in fields)
