"""The PROXY protocol codec (prefork_proxy.proxy_protocol): tables, split points, properties.

Pure logic, no sockets.  Every valid header is checked at every split point: each
prefix answers NeedMore (with a lower bound that does not overshoot the header),
and the full buffer, with stream bytes after the header, gives the header.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork_proxy import proxy_protocol as pp
from prefork_proxy.proxy_protocol import (
    REASONS,
    V2_SIGNATURE,
    NeedMore,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    encode_v2_local,
    parse,
)

SIG = V2_SIGNATURE
STREAM = b"GET / HTTP/1.0\r\n\r\n"  # what follows the header in the same buffer


def v2(ver_cmd: int, fam: int, block: bytes, len_field: int = -1) -> bytes:
    size = len(block) if len_field < 0 else len_field
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", size) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (bytes.fromhex("20010db8000000000000000000000001")
              + bytes.fromhex("20010db8000000000000000000000002") + struct.pack("!HH", 1, 65535))
UNIX_BLOCK = b"/run/client.sock".ljust(108, b"\0") + b"\0abstract".ljust(108, b"\0")


def H(version, command, family, protocol, src, dst, tlvs, length):  # noqa: N802 - table shorthand
    return ProxyHeader(version, command, family, protocol, src, dst, tuple(tlvs), length)


# (id, header bytes, expected answer).  Each is also parsed with STREAM appended.
VALID = [
    ("v1-tcp4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     H(1, "PROXY", "TCP4", "STREAM", ("192.168.0.1", 56324), ("192.168.0.11", 443), (), 47)),
    ("v1-tcp4-zeros", b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
     H(1, "PROXY", "TCP4", "STREAM", ("0.0.0.0", 0), ("0.0.0.0", 0), (), 32)),
    ("v1-tcp4-max", b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     H(1, "PROXY", "TCP4", "STREAM", ("255.255.255.255", 65535), ("255.255.255.255", 65535),
       (), 56)),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:DB8::2 1 65535\r\n",
     H(1, "PROXY", "TCP6", "STREAM", ("2001:db8::1", 1), ("2001:db8::2", 65535), (), 44)),
    ("v1-tcp6-shortest", b"PROXY TCP6 :: :: 0 0\r\n",
     H(1, "PROXY", "TCP6", "STREAM", ("::", 0), ("::", 0), (), 22)),
    ("v1-tcp6-mapped", b"PROXY TCP6 ::ffff:127.0.0.1 ::ffff:127.0.0.2 40000 25\r\n",
     H(1, "PROXY", "TCP6", "STREAM", ("::ffff:127.0.0.1", 40000), ("::ffff:127.0.0.2", 25),
       (), 55)),
    ("v1-tcp6-full", b"PROXY TCP6 " + b":".join([b"ffff"] * 8) + b" "
     + b":".join([b"FFFF"] * 8) + b" 65535 65535\r\n",
     H(1, "PROXY", "TCP6", "STREAM", (":".join(["ffff"] * 8), 65535),
       (":".join(["ffff"] * 8), 65535), (), 104)),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", H(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, (), 15)),
    ("v1-unknown-long", b"PROXY UNKNOWN " + b":".join([b"ffff"] * 8) + b" "
     + b":".join([b"ffff"] * 8) + b" 65535 65535\r\n",
     H(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, (), 107)),
    ("v1-unknown-junk", b"PROXY UNKNOWN whatever \x00\xff here\r\n",
     H(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, (), 32)),
    ("v2-tcp4", v2(0x21, 0x11, IPV4_BLOCK),
     H(2, "PROXY", "TCP4", "STREAM", ("192.0.2.1", 56324), ("198.51.100.7", 443), (), 28)),
    ("v2-tcp4-tlvs", v2(0x21, 0x11, IPV4_BLOCK + tlv(0x01, b"h2") + tlv(0x04, b"")
                        + tlv(0xE0, b"x" * 300)),
     H(2, "PROXY", "TCP4", "STREAM", ("192.0.2.1", 56324), ("198.51.100.7", 443),
       ((0x01, b"h2"), (0x04, b""), (0xE0, b"x" * 300)), 28 + 5 + 3 + 303)),
    ("v2-udp4", v2(0x21, 0x12, IPV4_BLOCK),
     H(2, "PROXY", "TCP4", "DGRAM", ("192.0.2.1", 56324), ("198.51.100.7", 443), (), 28)),
    ("v2-tcp6", v2(0x21, 0x21, IPV6_BLOCK),
     H(2, "PROXY", "TCP6", "STREAM", ("2001:db8::1", 1), ("2001:db8::2", 65535), (), 52)),
    ("v2-tcp6-tlv", v2(0x21, 0x21, IPV6_BLOCK + tlv(0x02, b"example.com")),
     H(2, "PROXY", "TCP6", "STREAM", ("2001:db8::1", 1), ("2001:db8::2", 65535),
       ((0x02, b"example.com"),), 52 + 14)),
    ("v2-udp6", v2(0x21, 0x22, IPV6_BLOCK),
     H(2, "PROXY", "TCP6", "DGRAM", ("2001:db8::1", 1), ("2001:db8::2", 65535), (), 52)),
    ("v2-unix", v2(0x21, 0x31, UNIX_BLOCK),
     H(2, "PROXY", "UNIX", "STREAM", b"/run/client.sock", b"\0abstract", (), 232)),
    ("v2-unix-dgram-tlv", v2(0x21, 0x32, UNIX_BLOCK + tlv(0x05, b"id-1")),
     H(2, "PROXY", "UNIX", "DGRAM", b"/run/client.sock", b"\0abstract", ((0x05, b"id-1"),),
       239)),
    ("v2-unspec", v2(0x21, 0x00, b""), H(2, "PROXY", "UNSPEC", "UNSPEC", None, None, (), 16)),
    ("v2-unspec-tlv", v2(0x21, 0x00, tlv(0x04, b"pad")),
     H(2, "PROXY", "UNSPEC", "UNSPEC", None, None, ((0x04, b"pad"),), 22)),
    ("v2-local", v2(0x20, 0x00, b""), H(2, "LOCAL", "UNSPEC", "UNSPEC", None, None, (), 16)),
    # LOCAL: the block is skipped whatever it holds, whatever the family byte says.
    ("v2-local-with-addresses", v2(0x20, 0x11, IPV4_BLOCK),
     H(2, "LOCAL", "UNSPEC", "UNSPEC", None, None, (), 28)),
    ("v2-local-odd-family", v2(0x20, 0x77, b"\xff\xff"),
     H(2, "LOCAL", "UNSPEC", "UNSPEC", None, None, (), 18)),
]


@pytest.mark.parametrize("raw,expected", [(r, e) for _, r, e in VALID],
                         ids=[i for i, _, _ in VALID])
def test_valid_header_at_every_split_point(raw: bytes, expected: ProxyHeader) -> None:
    assert expected.length == len(raw)
    version = f"v{expected.version}"
    for buffer in (raw, raw + STREAM):
        for mode in ("any", version):
            assert parse(buffer, mode) == expected
            assert buffer[expected.length:] == buffer[len(raw):]
            for cut in range(len(raw)):
                answer = parse(buffer[:cut], mode)
                assert isinstance(answer, NeedMore), (cut, answer)
                # A lower bound: waiting for it never waits past the header's end.
                assert 1 <= answer.at_least <= len(raw) - cut, (cut, answer)
            # Whatever follows the complete header does not change the answer.
            for extra in range(len(raw), len(buffer) + 1):
                assert parse(buffer[:extra], mode) == expected


def test_bytearray_and_memoryview_parse_as_bytes() -> None:
    raw = VALID[0][1] + STREAM
    assert parse(bytearray(raw)) == parse(memoryview(raw)) == parse(raw) == VALID[0][2]


def test_v2_need_more_is_exact_once_the_fixed_part_is_in() -> None:
    raw = v2(0x21, 0x11, IPV4_BLOCK + tlv(1, b"abc"))
    assert parse(raw[:16]) == NeedMore(len(raw) - 16)
    assert parse(raw[:20]) == NeedMore(len(raw) - 20)


def test_client_is_the_source_only_for_proxied_tcp_streams() -> None:
    clients = {name: expected.client for name, _, expected in VALID}
    assert clients["v1-tcp4"] == ("192.168.0.1", 56324)
    assert clients["v1-tcp6"] == ("2001:db8::1", 1)
    assert clients["v2-tcp4"] == ("192.0.2.1", 56324)
    assert clients["v2-tcp6"] == ("2001:db8::1", 1)
    for name in ("v1-unknown", "v2-udp4", "v2-udp6", "v2-unix", "v2-unspec", "v2-local",
                 "v2-local-with-addresses"):
        assert clients[name] is None, name


LONG_V1 = b"PROXY UNKNOWN " + b"f" * 93  # 107 bytes, no CRLF

# (id, bytes, mode, reason).  The bytes are the whole buffer: every one of them
# must be rejected, not answered with NeedMore.
REJECT = [
    ("empty-start-junk", b"GET / HTTP/1.1\r\n", "any", "bad_signature"),
    ("lowercase-proxy", b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "any", "bad_signature"),
    ("proxy-no-space", b"PROXYTCP4", "any", "bad_signature"),
    ("tls-hello", b"\x16\x03\x01\x02\x00", "any", "bad_signature"),
    ("v1-when-v2", b"P", "v2", "version_not_allowed"),
    ("v2-when-v1", b"\r", "v1", "version_not_allowed"),
    ("v2-sig-typo", SIG[:7] + b"X", "any", "bad_signature"),
    ("crlf-then-http", b"\r\nGET", "any", "bad_signature"),
    ("bad-family-word", b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "any", "bad_family"),
    ("bad-family-early", b"PROXY TCP5", "any", "bad_family"),
    ("tcp4-no-space", b"PROXY TCP4\r\n", "any", "bad_family"),
    ("unknownx", b"PROXY UNKNOWNX\r\n", "any", "bad_family"),
    ("too-long", LONG_V1, "any", "v1_too_long"),
    ("too-long-crlf-at-108", LONG_V1 + b"\r\n", "any", "v1_too_long"),
    ("cr-at-107", LONG_V1[:106] + b"\r\n", "any", "v1_too_long"),
    ("lone-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "any", "bad_line_ending"),
    ("lone-lf-early", b"PROXY TCP4 1.2\n", "any", "bad_line_ending"),
    ("lone-cr", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "any", "bad_line_ending"),
    ("cr-cr-lf", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "any", "bad_line_ending"),
    ("unknown-lone-lf", b"PROXY UNKNOWN a\nb\r\n", "any", "bad_line_ending"),
    ("double-space", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "any", "bad_syntax"),
    ("trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "any", "bad_syntax"),
    ("three-fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "any", "bad_syntax"),
    ("tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "any", "bad_syntax"),
    ("v4-leading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("v4-octet-256", b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("v4-three-parts", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("v6-in-tcp4", b"PROXY TCP4 ::1 ::1 1 2\r\n", "any", "bad_address"),
    ("v4-in-tcp6", b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("v6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "any", "bad_address"),
    ("v6-scope", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "any", "bad_address"),
    ("v6-five-hex", b"PROXY TCP6 12345::1 ::1 1 2\r\n", "any", "bad_address"),
    ("non-ascii-address", b"PROXY TCP4 \xd9\xa1.2.3.4 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "any", "bad_address"),
    ("port-65536", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "any", "bad_port"),
    ("port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "any", "bad_port"),
    ("port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "any", "bad_port"),
    ("port-minus", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n", "any", "bad_port"),
    ("port-underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "any", "bad_port"),
    ("port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", "any", "bad_port"),
    ("port-six-digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n", "any", "bad_port"),
    ("port-arabic-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(), "any", "bad_port"),
    ("v2-version-1", SIG + b"\x11", "any", "bad_version"),
    ("v2-version-3", SIG + b"\x31\x11\x00\x0c", "any", "bad_version"),
    ("v2-command-2", SIG + b"\x22", "any", "bad_command"),
    ("v2-command-f", SIG + b"\x2f", "v2", "bad_command"),
    ("v2-family-4", SIG + b"\x21\x41", "any", "bad_family"),
    ("v2-protocol-3", SIG + b"\x21\x13", "any", "bad_family"),
    ("v2-inet-unspec-protocol", SIG + b"\x21\x10", "any", "bad_family"),
    ("v2-unspec-stream", SIG + b"\x21\x01", "any", "bad_family"),
    ("v2-tcp4-short", v2(0x21, 0x11, IPV4_BLOCK[:11]), "any", "bad_address_length"),
    ("v2-tcp4-short-early", SIG + b"\x21\x11\x00\x0b", "any", "bad_address_length"),
    ("v2-tcp6-with-v4-block", v2(0x21, 0x21, IPV4_BLOCK), "any", "bad_address_length"),
    ("v2-unix-short", SIG + b"\x21\x31\x00\xd7", "any", "bad_address_length"),
    ("v2-too-long", SIG + b"\x21\x11\x10\x01", "any", "v2_too_long"),  # max_v2_length=4096
    ("v2-tlv-2-bytes-left", v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), "any", "bad_tlv"),
    ("v2-tlv-overruns", v2(0x21, 0x11, IPV4_BLOCK + tlv(1, b"abcd")[:-1]), "any", "bad_tlv"),
    ("v2-tlv-overruns-into-stream",
     v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x10", len_field=15) + b"x" * 64, "any", "bad_tlv"),
    ("v2-unspec-junk-tlvs", v2(0x21, 0x00, b"\xff"), "any", "bad_tlv"),
]


@pytest.mark.parametrize("raw,mode,reason", [(r, m, why) for _, r, m, why in REJECT],
                         ids=[i for i, _, _, _ in REJECT])
def test_must_reject(raw: bytes, mode: str, reason: str) -> None:
    assert reason in REASONS
    with pytest.raises(ProxyHeaderError) as caught:
        parse(raw, mode, max_v2_length=4096)
    assert caught.value.reason == reason, str(caught.value)
    # More bytes never turn a rejection into anything else.
    with pytest.raises(ProxyHeaderError) as caught:
        parse(raw + STREAM + b"\r\n", mode, max_v2_length=4096)
    assert caught.value.reason == reason


def test_wrong_version_is_rejected_on_the_first_byte() -> None:
    for mode, raw in (("v1", encode_v2_local()), ("v2", b"PROXY UNKNOWN\r\n")):
        for cut in range(1, len(raw) + 1):
            with pytest.raises(ProxyHeaderError, match="version_not_allowed"):
                parse(raw[:cut], mode)


def test_max_v2_length_bounds_the_header_before_it_arrives() -> None:
    raw = v2(0x21, 0x11, IPV4_BLOCK + tlv(0xE0, b"x" * 5000))
    assert isinstance(parse(raw[:16]), NeedMore)
    with pytest.raises(ProxyHeaderError, match="v2_too_long"):
        parse(raw[:16], max_v2_length=4096)
    assert parse(raw + STREAM).length == len(raw)


def test_unknown_version_mode_is_a_caller_error() -> None:
    with pytest.raises(ValueError) as caught:
        parse(b"PROXY", "v3")
    assert not isinstance(caught.value, ProxyHeaderError)


# ----------------------------------------------------------------------------- encoders

def test_encode_v1_tcp4_and_tcp6() -> None:
    assert (encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
            == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    # getpeername() tuples of IPv6 sockets (flowinfo, scope id) are taken as they are.
    assert (encode_v1(("2001:DB8:0:0:0:0:0:1", 1, 0, 0), ("fe80::2%lo", 2, 0, 1))
            == b"PROXY TCP6 2001:db8::1 fe80::2 1 2\r\n")


def test_encode_v1_spells_ipv6_in_hex_groups_only() -> None:
    # inet_ntop would write ::ffff:1.2.3.4; the v1 grammar is hexadecimal groups.
    assert encode_v1(("::ffff:1.2.3.4", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:102:304 ::1 1 2\r\n"
    assert (encode_v1(("1:0:0:2:0:0:0:3", 1), ("1:0:2:0:3:0:4:0", 2))
            == b"PROXY TCP6 1:0:0:2::3 1:0:2:0:3:0:4:0 1 2\r\n")
    assert encode_v1(("1:0:0:2:3:0:0:4", 1), ("::", 2)) == b"PROXY TCP6 1::2:3:0:0:4 :: 1 2\r\n"


def test_encode_mixed_families_maps_ipv4_into_ipv6() -> None:
    header = parse(encode_v2(("127.0.0.1", 5), ("::1", 6)))
    assert header.family == "TCP6" and header.source == ("::ffff:127.0.0.1", 5)
    header = parse(encode_v1(("::1", 5), ("127.0.0.1", 6)))
    assert header.destination == ("::ffff:127.0.0.1", 6)


def test_encode_unknown_unix_unspec_and_local() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1("/run/a.sock", "/run/b.sock") == b"PROXY UNKNOWN\r\n"
    assert encode_v2(None, None) == SIG + b"\x21\x00\x00\x00"
    assert encode_v2_local() == SIG + b"\x20\x00\x00\x00"
    assert encode_v2_local([(4, b"ab")]) == SIG + b"\x20\x00\x00\x05\x04\x00\x02ab"
    header = parse(encode_v2("/run/a.sock", b"\0abstract"))
    assert (header.family, header.source, header.destination) == ("UNIX", b"/run/a.sock",
                                                                   b"\0abstract")


@pytest.mark.parametrize("call", [
    lambda: encode_v1(("not-an-ip", 1), ("1.2.3.4", 2)),
    lambda: encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 2)),
    lambda: encode_v2(("1.2.3.4", -1), ("1.2.3.4", 2)),
    lambda: encode_v2((1234, 1), ("1.2.3.4", 2)),
    lambda: encode_v2("x" * 109, "/b"),
    lambda: encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), [(256, b"")]),
    lambda: encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2), [(1, b"x" * 65536)]),
    lambda: encode_v2_local([(1, b"x" * 65530), (2, b"y" * 10)]),
], ids=["bad-ip", "port-high", "port-negative", "ip-not-str", "unix-too-long", "tlv-type",
        "tlv-too-long", "block-too-long"])
def test_encoder_misuse_is_a_value_error(call) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    assert not isinstance(caught.value, ProxyHeaderError)


# --------------------------------------------------------------------------- properties

ipv4 = st.builds(lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")),
                 st.integers(0, 2**32 - 1))
ipv6 = st.binary(min_size=16, max_size=16).map(
    lambda b: pp.socket.inet_ntop(pp.socket.AF_INET6, b))
port = st.integers(0, 65535)
tlv_list = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


@st.composite
def valid_headers(draw):
    """(raw header, expected client or None) from the encoders and hand-made v1/v2 forms."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-unix",
                                 "v2-unspec", "v2-local"]))
    family_ip = ipv6 if kind.endswith("6") else ipv4
    src = (draw(family_ip), draw(port))
    dst = (draw(family_ip), draw(port))
    if kind.startswith("v1-unknown"):
        return b"PROXY UNKNOWN" + draw(st.sampled_from([b"", b" " + encode_v1(src, dst)[11:-2]])) \
            + b"\r\n", None
    if kind.startswith("v1"):
        return encode_v1(src, dst), src
    tlvs = draw(tlv_list)
    if kind == "v2-unix":
        return encode_v2(draw(st.binary(max_size=108)), "/b", tlvs), None
    if kind == "v2-unspec":
        return encode_v2(None, None, tlvs), None
    if kind == "v2-local":
        return encode_v2_local(tlvs), None
    return encode_v2(src, dst, tlvs), src


def mutate(raw: bytes, data) -> bytes:
    """Flip, insert, delete or truncate a few bytes of ``raw``."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[at] = data.draw(st.sampled_from([0, 0x0A, 0x0D, 0x20, 0x30, 0xFF, 0x21]))
        elif op == "insert":
            buf[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif op == "delete" and buf:
            del buf[at]
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


def answers_by_prefix(buffer: bytes, mode: str = "any") -> list:
    """parse() of every prefix of ``buffer``: NeedMore, a ProxyHeader, or the reason string."""
    out = []
    for cut in range(len(buffer) + 1):
        try:
            out.append(parse(buffer[:cut], mode))
        except ProxyHeaderError as error:
            assert error.reason in REASONS, error.reason
            out.append(error.reason)
    return out


ADDRESS_BLOCK = {"TCP4": 12, "TCP6": 36, "UNIX": 216, "UNSPEC": 0}


def check_consistent(buffer: bytes, mode: str = "any") -> object:
    """Split invariance over ``buffer``: NeedMore while undecided, then one answer for good.

    Also: a header never claims more bytes than were given, v2 exactly 16 + len.
    Returns the final answer.
    """
    answers = answers_by_prefix(buffer, mode)
    decided = next((i for i, a in enumerate(answers) if not isinstance(a, NeedMore)), None)
    for cut, answer in enumerate(answers[:decided]):
        assert answer.at_least >= 1
        if decided is not None and isinstance(answers[decided], ProxyHeader):
            assert cut + answer.at_least <= decided
    if decided is None:
        return answers[-1]
    final = answers[decided]
    assert all(a == final for a in answers[decided:]), (decided, final)
    if isinstance(final, ProxyHeader):
        assert final.length == decided <= len(buffer)
        if final.version == 2:
            assert final.length == 16 + struct.unpack_from("!H", buffer, 14)[0]
            if final.command == "PROXY":
                # Addresses and TLVs tile the block exactly: nothing cut short, nothing past it.
                used = ADDRESS_BLOCK[final.family] + sum(3 + len(v) for _, v in final.tlvs)
                assert used == final.length - 16
        else:
            line = buffer[:final.length - 2]
            assert final.length <= pp.V1_MAX_LENGTH and buffer[len(line):final.length] == b"\r\n"
            assert b"\r" not in line and b"\n" not in line
    return final


# Bounded (~4 s for all properties), the same examples every run (no flaky CI), and no
# example database written into the checkout; scripts/fuzz_proxy_protocol.py goes wide.
BOUNDED = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])
PROPERTY = settings(max_examples=1000, **BOUNDED)


@PROPERTY
@given(valid_headers(), st.binary(max_size=20))
def test_property_valid_headers_split_anywhere(header, tail) -> None:
    raw, client = header
    final = check_consistent(raw + tail)
    assert isinstance(final, ProxyHeader) and final.length == len(raw)
    assert final.client == client


@settings(max_examples=500, **BOUNDED)
@given(st.binary(max_size=140), st.sampled_from(["any", "v1", "v2"]))
def test_property_random_bytes(buffer, mode) -> None:
    check_consistent(buffer, mode)


@settings(max_examples=500, **BOUNDED)
@given(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG,
                        SIG + b"\x21\x11", SIG + b"\x21\x00\x00\x08"]),
       st.binary(max_size=80))
def test_property_random_bytes_after_a_valid_start(start, rest) -> None:
    check_consistent(start + rest)


@PROPERTY
@given(valid_headers(), st.data())
def test_property_mutated_headers(header, data) -> None:
    buffer = mutate(header[0] + b"tail", data)
    check_consistent(buffer, data.draw(st.sampled_from(["any", "v1", "v2"])))


@settings(max_examples=300, **BOUNDED)
@given(st.binary(min_size=80, max_size=110).map(lambda b: b.translate(None, b"\r\n")),
       st.binary(max_size=10))
def test_property_v1_line_is_accepted_exactly_up_to_107_bytes(junk, tail) -> None:
    line = b"PROXY UNKNOWN " + junk + b"\r\n"
    final = check_consistent(line + tail)
    if len(line) <= pp.V1_MAX_LENGTH:
        assert isinstance(final, ProxyHeader) and final.length == len(line)
    else:
        assert final == "v1_too_long"


def _endpoints() -> st.SearchStrategy:
    ports = st.one_of(st.integers(-2, 70000), st.just(True), st.floats(0, 10), st.text(max_size=2))
    ips = st.one_of(st.ip_addresses().map(str), st.sampled_from(["1.2.3.4%x", "1.2.3", "", " ::1"]),
                    st.text(max_size=6), st.integers(0, 9))
    return st.one_of(st.tuples(ips, ports), st.tuples(ips),
                     st.tuples(ips, ports, st.just(0), st.just(0)), st.just(()), st.none(),
                     st.sampled_from(["/tmp/s", b"\x00name"]),
                     st.lists(ips, min_size=2, max_size=2))


def _outcome(encode, src, dst) -> object:
    try:
        return encode(src, dst)
    except Exception as exc:  # the type is what both paths must share
        return type(exc)


@PROPERTY
@given(_endpoints(), _endpoints())
def test_property_encode_v2_fast_path_is_the_general_encoding(src, dst) -> None:
    """``encode_v2``'s one-pack IPv4 path gives exactly the general encoder's bytes,
    or the general encoder's error, for every kind of endpoint."""
    expected = _outcome(lambda s, d: pp._encode_v2_general(s, d, ()), src, dst)
    assert _outcome(pp.encode_v2, src, dst) == expected


def _parse_outcome(parse_v2, data: bytes, max_len: int) -> object:
    try:
        return parse_v2(data, max_len)
    except pp.ProxyHeaderError as exc:
        return exc.reason


@st.composite
def _v2_inet_headers(draw) -> bytes:
    """Mostly valid TCP4/TCP6 PROXY headers (TLVs, odd ``len``), then cut or mutated."""
    six = draw(st.booleans())
    addresses = st.ip_addresses(v=6 if six else 4).map(str)
    src = (draw(addresses), draw(st.integers(0, 65535)))
    dst = (draw(addresses), draw(st.integers(0, 65535)))
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=3))
    data = bytearray(pp.encode_v2(src, dst, tlvs))
    if draw(st.booleans()):  # a len that disagrees with what follows, often by a byte or two
        block = len(data) - 16
        size = draw(st.one_of(st.integers(block - 3, block + 3), st.integers(0, 300)))
        data[14:16] = size.to_bytes(2, "big")
    for _ in range(draw(st.integers(0, 2))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data += draw(st.binary(max_size=8))
    if draw(st.booleans()):  # whole (the fast path's case) or cut anywhere
        return bytes(data)
    return bytes(data[:draw(st.integers(0, len(data)))])


@PROPERTY
@given(_v2_inet_headers(), st.sampled_from([pp.V2_MAX_LEN_FIELD, 4096, 30, 12]))
def test_property_parse_v2_fast_path_is_the_general_parse(data, max_len) -> None:
    """The TCP4/TCP6 fast path gives exactly the general parser's header, NeedMore or
    refusal reason, on valid, cut and mutated headers, under every ``len`` bound."""
    expected = _parse_outcome(pp._parse_v2_general, data, max_len)
    assert _parse_outcome(pp._parse_v2, data, max_len) == expected
    # The relay parses its bytearray buffer: the same answer.
    assert _parse_outcome(pp._parse_v2, bytearray(data), max_len) == expected


def test_the_address_memos_are_bounded_exact_and_keep_no_bad_address() -> None:
    """The fast paths' remembered conversions give what inet_ntop/inet_pton give, never
    hold more than ADDRESS_MEMO_SIZE entries, and remember no failed conversion."""
    import socket

    pp._TEXT_OF.clear()
    pp._PACKED_V4.clear()
    for n in range(pp.ADDRESS_MEMO_SIZE + 50):
        raw = struct.pack("!I", 0x0A000000 + n)
        text = socket.inet_ntop(socket.AF_INET, raw)
        assert pp._address_text(raw) == text
        assert pp._ipv4_packed(text) == raw
        assert len(pp._TEXT_OF) <= pp.ADDRESS_MEMO_SIZE
        assert len(pp._PACKED_V4) <= pp.ADDRESS_MEMO_SIZE
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    assert pp._address_text(six) == "2001:db8::7"
    for bad in ("10.0.0", "::1", "fe80::1%eth0", "10.0.0.256"):
        with pytest.raises(OSError):
            pp._ipv4_packed(bad)
        assert bad not in pp._PACKED_V4
    # Through the public calls: a remembered address parses and encodes the same.
    header = pp.encode_v2(("10.0.0.5", 40000), ("10.0.0.6", 6379))
    assert header == pp._encode_v2_general(("10.0.0.5", 40000), ("10.0.0.6", 6379), ())
    again = pp.parse(header + b"stream", "v2")
    assert isinstance(again, pp.ProxyHeader)
    assert again.source == ("10.0.0.5", 40000) and again.destination == ("10.0.0.6", 6379)
