"""The PROXY protocol (v1 text and v2 binary): a pure parser and encoders.

Owns the wire format only: no sockets, no clock, no configuration.  The spec
is HAProxy's ``doc/proxy-protocol.txt``.  Called by whoever reads the first
bytes of an accepted connection (the pre-connect phase of a relay thread) and
by whoever writes the first bytes to a backend; every function here is
thread-safe because nothing here keeps state.

Parsing
-------
``parse(data, version="any")`` looks at the bytes received so far and answers
one of three things:

* ``NeedMore(at_least)``: every byte so far may still begin a valid header;
  call again when at least ``at_least`` more bytes have arrived (a lower
  bound: exact for v2 once the 16-byte fixed part is in, a guess from the
  shortest possible line for v1).
* a ``ProxyHeader``: a complete, valid header of ``length`` bytes.  Bytes
  after ``length`` belong to the stream, even when they came in the same read.
* it raises ``ProxyHeaderError`` whose ``reason`` (one of ``REASONS``) is a
  short label for metrics and logs.

The caller owns time and the socket: ``NeedMore`` when the peer closes is a
partial header, which the spec says to reject (``truncated``), and so is one
still incomplete at the deadline (``timeout``); both labels are in ``REASONS``.
Nothing may be sent to a backend before a ``ProxyHeader`` has come back.

Principle (split-invariant): the answer depends on the bytes only, never on how
they were cut into reads.  A prefix of a valid header always answers
``NeedMore``; once some prefix is rejected, every longer buffer is rejected
with the same reason; once a header is complete, more bytes do not change it.
That is why the v1 checks run in a fixed order (signature, family word, line
endings, length, then the grammar once the CRLF is in) and why v2 rejects on
each fixed field as soon as it has arrived.

Principle (never past ``len``): a v2 header is exactly ``16 + len`` bytes; the
address block and the TLVs are read inside that window only, and a TLV whose
length runs past it is rejected (``bad_tlv``).  A v1 header is at most 107
bytes including the CRLF; nothing past the first CRLF is looked at.

Choices the spec leaves open, made here:

* ``version`` restricts what is accepted: ``"v1"``, ``"v2"`` or ``"any"``.
  The first byte tells them apart (``P`` for v1, ``\\r`` for v2), so the
  wrong version is rejected on the first byte (``version_not_allowed``).
* v1: the grammar is strict: single spaces, IPv4 as four decimal numbers
  without leading zeros, IPv6 whatever ``inet_pton`` accepts (which includes
  the ``::ffff:1.2.3.4`` form HAProxy itself sends), ports 0-65535 in decimal
  without leading zeros, the addresses' family matching the word.
  ``UNKNOWN`` may be followed by anything up to the CRLF (the spec says to
  ignore it), which HAProxy's receiver does not accept but its spec does.
  A lone CR or LF before the CRLF is rejected (``bad_line_ending``).
* v2 ``LOCAL``: the whole block after the 16 bytes is skipped without being
  interpreted (the spec: "discard the protocol block including the family"),
  so any family byte is accepted and ``tlvs`` is empty.
* v2 ``PROXY``: the family/protocol byte must be one of the seven the spec
  lists (``\\x00 \\x11 \\x12 \\x21 \\x22 \\x31 \\x32``), anything else is
  ``bad_family``.  ``len`` shorter than the family's address block is
  ``bad_address_length`` (rejected as soon as the 16 bytes are in); the bytes
  after the address block are TLVs, which are kept as ``(type, value)``
  pairs, not interpreted (CRC32C is not verified).
* v2 ``DGRAM`` (UDP, unix datagram) is parsed and reported as it is, but
  ``ProxyHeader.client`` is ``None`` for it: this is a TCP proxy, so, as the
  spec asks of receivers that do not support a protocol, it falls back to the
  real connection endpoints.  The same goes for ``LOCAL``, ``UNSPEC``,
  ``UNKNOWN`` and ``UNIX`` (a unix path is no client address for ACLs).
* ``max_v2_length`` (default: the protocol's own 65535) rejects a longer
  ``len`` as ``v2_too_long`` at once, so a caller can bound its buffer.

Encoding
--------
``encode_v1(src, dst)``, ``encode_v2(src, dst, tlvs=())`` and
``encode_v2_local(tlvs=())``.  ``src`` and ``dst`` are what ``getpeername()``
and ``getsockname()`` return: an ``(ip, port, ...)`` tuple for TCP (a
``%scope`` suffix is dropped), a ``str``/``bytes`` path for a unix socket, or
``None`` when unknown.  TCP gives ``TCP4``/``TCP6`` (an IPv4 and an IPv6
address together are both sent as IPv6, the IPv4 one mapped, as HAProxy
does); anything else gives v1 ``UNKNOWN``, and v2 ``UNIX`` (both paths) or
``UNSPEC``.  Encoder misuse raises ``ValueError``.

Cost: ``parse`` is called once per read until the header is complete (a few
microseconds: bytes methods, ``struct``, ``inet_ntop``; no loop per byte;
the only loop is one turn per TLV).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Iterable, Optional, Tuple, Union

__all__ = [
    "REASONS",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "NeedMore",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "encode_v2_local",
    "parse",
]

#: The 12 bytes every v2 header starts with (contains a NUL: never a C string).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
V1_MAX_LENGTH = 107
#: Fixed part of a v2 header: signature, version/command, family/protocol, len.
V2_FIXED_LENGTH = 16
#: Largest ``len`` the 16-bit field can carry.
V2_MAX_LEN_FIELD = 0xFFFF

#: Every ``ProxyHeaderError.reason``: a bounded set, safe as a metrics label.
REASONS = frozenset({
    "bad_signature",        # neither "PROXY " nor the v2 signature
    "version_not_allowed",  # a valid start of the version the listener does not accept
    "bad_version",          # v2: version nibble other than 2
    "bad_command",          # v2: command other than LOCAL (0) and PROXY (1)
    "bad_family",           # v1: not TCP4/TCP6/UNKNOWN; v2: an unlisted family/protocol byte
    "bad_line_ending",      # v1: a CR or LF that is not part of the final CRLF
    "v1_too_long",          # v1: no CRLF within 107 bytes
    "bad_syntax",           # v1: not exactly "<src> <dst> <sport> <dport>" with single spaces
    "bad_address",          # v1: an address that is not a literal of the announced family
    "bad_port",             # v1: a port not in 0-65535, or with a sign or leading zero
    "bad_address_length",   # v2: len shorter than the family's address block
    "v2_too_long",          # v2: len above max_v2_length
    "bad_tlv",              # v2: a TLV running past the end of the header
    # Not raised by parse(): for the caller, which alone sees the clock and the socket.
    "timeout",              # the whole header did not arrive in time
    "truncated",            # the peer closed while parse() still answered NeedMore
})

_V1_PREFIX = b"PROXY "
_V1_MIN = {b"TCP4": 32, b"TCP6": 22, b"UNKNOWN": 15}  # shortest line of each family
_V1_FAMILY_WORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")

# v2 family/protocol byte -> (family, protocol, address block size).
_V2_FAMILIES = {
    0x00: ("UNSPEC", "UNSPEC", 0),
    0x11: ("TCP4", "STREAM", 12),
    0x12: ("TCP4", "DGRAM", 12),
    0x21: ("TCP6", "STREAM", 36),
    0x22: ("TCP6", "DGRAM", 36),
    0x31: ("UNIX", "STREAM", 216),
    0x32: ("UNIX", "DGRAM", 216),
}

_HEADER_V2 = struct.Struct("!12sBBH")
_IPV4_BLOCK = struct.Struct("!4s4sHH")
_IPV6_BLOCK = struct.Struct("!16s16sHH")
_UNIX_BLOCK = struct.Struct("!108s108s")
_TLV_HEAD = struct.Struct("!BH")
#: The first 16 bytes of every v2 PROXY header of a TCP-over-IPv4 connection.
_V2_TCP4_START = _HEADER_V2.pack(V2_SIGNATURE, 0x21, 0x11, _IPV4_BLOCK.size)

#: An endpoint as reported: ``(ip, port)`` for TCP4/TCP6, a unix path (bytes, trailing NULs
#: dropped; an abstract name keeps its leading NUL), or ``None``.
Address = Union[Tuple[str, int], bytes, None]
#: An endpoint given to the encoders: a getpeername()/getsockname() value or None.
Endpoint = Union[tuple, str, bytes, None]
#: TLVs given to the encoders: ``(type, value)`` pairs.
Tlvs = Iterable[Tuple[int, bytes]]


class ProxyHeaderError(ValueError):
    """The bytes are not (and can never become) a header this parser accepts.

    ``reason`` is one of ``REASONS`` (for ``rejected_connections_total{reason}``);
    ``str()`` adds a short human detail for the log.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class NeedMore:
    """No verdict yet: wait for at least ``at_least`` more bytes (always >= 1)."""

    __slots__ = ("at_least",)

    def __init__(self, at_least: int) -> None:
        self.at_least = at_least

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeedMore) and other.at_least == self.at_least

    def __hash__(self) -> int:
        return hash(("NeedMore", self.at_least))

    def __repr__(self) -> str:
        return f"NeedMore(at_least={self.at_least})"


class ProxyHeader:
    """A complete, valid header.

    ``version`` 1 or 2; ``command`` "PROXY" or "LOCAL" (v1 is always "PROXY");
    ``family`` "TCP4", "TCP6", "UNIX", "UNSPEC" (v2) or "UNKNOWN" (v1);
    ``protocol`` "STREAM", "DGRAM" or "UNSPEC"; ``source`` and ``destination``
    as described by ``Address`` (``None`` for LOCAL, UNSPEC and UNKNOWN);
    ``tlvs`` a tuple of ``(type, value)``; ``length`` the bytes the header
    takes at the start of the buffer.
    """

    __slots__ = ("version", "command", "family", "protocol", "source", "destination",
                 "tlvs", "length")

    def __init__(self, version: int, command: str, family: str, protocol: str,
                 source: Address, destination: Address,
                 tlvs: Tuple[Tuple[int, bytes], ...], length: int) -> None:
        self.version = version
        self.command = command
        self.family = family
        self.protocol = protocol
        self.source = source
        self.destination = destination
        self.tlvs = tlvs
        self.length = length

    @property
    def client(self) -> Optional[Tuple[str, int]]:
        """The client's ``(ip, port)`` to use instead of the socket peer, or ``None``.

        ``None`` means "use the real connection endpoints": LOCAL, UNKNOWN, UNSPEC,
        UNIX and DGRAM headers (see the module docstring).
        """
        if (self.command == "PROXY" and self.protocol == "STREAM"
                and (self.family == "TCP4" or self.family == "TCP6")):
            return self.source  # type: ignore[return-value]
        return None

    def _key(self) -> tuple:
        return (self.version, self.command, self.family, self.protocol, self.source,
                self.destination, self.tlvs, self.length)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProxyHeader) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return ("ProxyHeader(version={!r}, command={!r}, family={!r}, protocol={!r}, "
                "source={!r}, destination={!r}, tlvs={!r}, length={!r})").format(*self._key())


# --------------------------------------------------------------------------- parsing

def parse(data: Union[bytes, bytearray, memoryview], version: str = "any",
          max_v2_length: int = V2_MAX_LEN_FIELD) -> Union[NeedMore, ProxyHeader]:
    """Parse the header at the start of ``data`` (the bytes received so far).

    Returns ``NeedMore`` or a ``ProxyHeader``; raises ``ProxyHeaderError``.
    ``version`` is "v1", "v2" or "any"; anything else is a ``ValueError`` of the
    caller (not a ``ProxyHeaderError``).
    """
    if data and data[0] == 0x0D and (version == "v2" or version == "any") \
            and type(data) is not memoryview:
        return _parse_v2(data, max_v2_length)  # a v2 header where one may come: the usual case
    if version not in ("any", "v1", "v2"):
        raise ValueError(f"version must be 'v1', 'v2' or 'any', not {version!r}")
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not data:
        return NeedMore(_V1_MIN[b"UNKNOWN"] if version != "v2" else V2_FIXED_LENGTH)
    first = data[0]
    if first == 0x50:  # "P"
        if version == "v2":
            raise ProxyHeaderError("version_not_allowed", "a v1 header where v2 is required")
        return _parse_v1(data)
    if first == 0x0D:  # "\r"
        if version == "v1":
            raise ProxyHeaderError("version_not_allowed", "a v2 header where v1 is required")
        return _parse_v2(data, max_v2_length)
    raise ProxyHeaderError("bad_signature", f"first byte {first:#04x}")


def _parse_v1(data: Union[bytes, bytearray]) -> Union[NeedMore, ProxyHeader]:
    # Only the first 107 bytes can be header: look no further, whatever has arrived.
    window = bytes(data[:V1_MAX_LENGTH])
    have = len(window)
    if not window.startswith(_V1_PREFIX):
        if not _V1_PREFIX.startswith(window):
            raise ProxyHeaderError("bad_signature", "not 'PROXY '")
        return NeedMore(_V1_MIN[b"UNKNOWN"] - have)
    # The family word, checked on whatever part of it has arrived.
    rest = window[6:14]  # enough for "UNKNOWN" and the byte after it
    word = b""
    shortest = 0  # shortest line among the family words ``rest`` may still begin
    for candidate in _V1_FAMILY_WORDS:
        if rest.startswith(candidate):
            word = candidate
            break
        if candidate.startswith(rest):
            at_least = _V1_MIN[candidate.rstrip()]
            shortest = at_least if not shortest else min(shortest, at_least)
    if not word:
        if shortest:
            return NeedMore(shortest - have)
        raise ProxyHeaderError("bad_family", "not TCP4, TCP6 or UNKNOWN")
    family = word.rstrip()
    if family == b"UNKNOWN" and len(rest) > 7 and rest[7] not in (0x20, 0x0D):
        raise ProxyHeaderError("bad_family", "not TCP4, TCP6 or UNKNOWN")
    end = window.find(b"\r\n")
    line = window if end < 0 else window[:end]
    # A CR or LF before the first CRLF is a lone one (a CR as the very last byte
    # so far may still be followed by its LF; as byte 107 its LF would be byte
    # 108: that line is too long, not badly ended).
    lone = line.find(b"\n")
    if lone < 0:
        lone = line.find(b"\r")
        if end < 0 and lone == have - 1:
            lone = -1
    if lone >= 0:
        raise ProxyHeaderError("bad_line_ending", f"lone CR or LF at byte {lone}")
    if end < 0:
        if have >= V1_MAX_LENGTH:
            raise ProxyHeaderError("v1_too_long", f"no CRLF in {V1_MAX_LENGTH} bytes")
        return NeedMore(max(_V1_MIN[family] - have, 1))
    length = end + 2
    if family == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", "UNSPEC", None, None, (), length)
    fields = line[11:].split(b" ")
    if len(fields) != 4:
        raise ProxyHeaderError("bad_syntax", f"{len(fields)} space-separated fields, not 4")
    af = socket.AF_INET if family == b"TCP4" else socket.AF_INET6
    src = _v1_address(af, fields[0])
    dst = _v1_address(af, fields[1])
    sport = _v1_port(fields[2])
    dport = _v1_port(fields[3])
    return ProxyHeader(1, "PROXY", family.decode(), "STREAM", (src, sport), (dst, dport),
                       (), length)


def _v1_address(af: int, field: bytes) -> str:
    try:
        text = field.decode("ascii")
        packed = socket.inet_pton(af, text)
    except (UnicodeDecodeError, OSError, ValueError):
        # ValueError: an embedded NUL; OSError: not a literal of this family.
        raise ProxyHeaderError("bad_address", "not a literal of the announced family") from None
    canonical = socket.inet_ntop(af, packed)
    if af == socket.AF_INET and canonical != text:
        # inet_pton is lenient on some systems; the spec forbids leading zeros.
        raise ProxyHeaderError("bad_address", "IPv4 not in canonical dotted decimal")
    return canonical


def _v1_port(field: bytes) -> int:
    # bytes.isdigit is ASCII-only: no sign, space, underscore or non-ASCII digit gets through.
    if (not field.isdigit() or len(field) > 5 or (len(field) > 1 and field[0] == 0x30)):
        raise ProxyHeaderError("bad_port", "not a decimal 0-65535 without leading zeros")
    port = int(field)
    if port > 65535:
        raise ProxyHeaderError("bad_port", "above 65535")
    return port


#: The first 14 bytes of a v2 PROXY header of a TCP-over-IPv4/IPv6 connection: the
#: signature, version 2 + PROXY, the family/protocol byte (the fast path's test).
_V2_PROXY_TCP4 = V2_SIGNATURE + b"\x21\x11"
_V2_PROXY_TCP6 = V2_SIGNATURE + b"\x21\x21"
_AF_INET, _AF_INET6, _inet_ntop = socket.AF_INET, socket.AF_INET6, socket.inet_ntop

#: Addresses each memo below remembers before it starts over (per process).
ADDRESS_MEMO_SIZE = 4096
# The fast paths' address conversions, remembered: ``inet_ntop`` makes a new
# string each call (about 0.5 us, twice per header, where a dict lookup costs
# 0.03), and the same few addresses come back on every connection (the
# listener's own, a source that reconnects).  Bounded, emptied when full; only
# successful conversions are kept.  Single-key dict operations are atomic under
# the interpreter lock, so the relay threads of a worker share them.
_TEXT_OF: "dict[bytes, str]" = {}      # 4 or 16 packed bytes -> the address as text
_PACKED_V4: "dict[str, bytes]" = {}    # an IPv4 address as text -> its 4 bytes


def _address_text(packed: bytes) -> str:
    """``inet_ntop`` of 4 (IPv4) or 16 (IPv6) packed bytes, remembered."""
    text = _TEXT_OF.get(packed)
    if text is None:
        text = _inet_ntop(_AF_INET if len(packed) == 4 else _AF_INET6, packed)
        if len(_TEXT_OF) >= ADDRESS_MEMO_SIZE:
            _TEXT_OF.clear()
        _TEXT_OF[packed] = text
    return text


def _ipv4_packed(ip: str) -> bytes:
    """``inet_pton(AF_INET, ip)``, remembered (OSError, nothing kept, if not IPv4)."""
    packed = _PACKED_V4.get(ip)
    if packed is None:
        packed = socket.inet_pton(_AF_INET, ip)
        if len(_PACKED_V4) >= ADDRESS_MEMO_SIZE:
            _PACKED_V4.clear()
        _PACKED_V4[ip] = packed
    return packed


def _parse_v2(data: Union[bytes, bytearray], max_v2_length: int) -> Union[NeedMore, ProxyHeader]:
    """A v2 header: TCP4/TCP6 PROXY headers that are whole take the fast path (what a
    load balancer sends every connection), anything else ``_parse_v2_general``; both
    give the same answer for the same bytes (a property test holds them to it)."""
    have = len(data)
    if have >= 28:
        if data.startswith(_V2_PROXY_TCP4):
            family, block, end = "TCP4", _IPV4_BLOCK, 28
        elif data.startswith(_V2_PROXY_TCP6):
            family, block, end = "TCP6", _IPV6_BLOCK, 52
        else:
            return _parse_v2_general(data, max_v2_length)
        length = 16 + ((data[14] << 8) | data[15])
        if end <= length <= have and length - 16 <= max_v2_length:
            s, d, sport, dport = block.unpack_from(data, 16)
            # ``memo.get(x) or convert(x)``: a remembered text is never empty.
            return ProxyHeader(2, "PROXY", family, "STREAM",
                               (_TEXT_OF.get(s) or _address_text(s), sport),
                               (_TEXT_OF.get(d) or _address_text(d), dport),
                               _tlvs(data, end, length) if length > end else (), length)
    return _parse_v2_general(data, max_v2_length)


def _parse_v2_general(data: Union[bytes, bytearray],
                      max_v2_length: int) -> Union[NeedMore, ProxyHeader]:
    have = len(data)
    head = bytes(data[:12])
    if not V2_SIGNATURE.startswith(head):
        raise ProxyHeaderError("bad_signature", "not the v2 signature")
    if have < 13:
        return NeedMore(V2_FIXED_LENGTH - have)
    ver_cmd = data[12]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("bad_version", f"version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError("bad_command", f"command {command}")
    if have < 14:
        return NeedMore(V2_FIXED_LENGTH - have)
    fam = data[13]
    known = _V2_FAMILIES.get(fam)
    if command == 1 and known is None:
        raise ProxyHeaderError("bad_family", f"family/protocol byte {fam:#04x}")
    if have < V2_FIXED_LENGTH:
        return NeedMore(V2_FIXED_LENGTH - have)
    block = (data[14] << 8) | data[15]
    if block > max_v2_length:
        raise ProxyHeaderError("v2_too_long", f"len {block} above {max_v2_length}")
    if command == 1 and block < known[2]:  # type: ignore[index]
        raise ProxyHeaderError("bad_address_length",
                               f"len {block} below the {known[2]} bytes of {known[0]}")  # type: ignore[index]
    length = V2_FIXED_LENGTH + block
    if have < length:
        return NeedMore(length - have)
    if command == 0:
        return ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", None, None, (), length)
    family, protocol, size = known  # type: ignore[misc]
    source: Address = None
    destination: Address = None
    if family == "TCP4":
        s, d, sport, dport = _IPV4_BLOCK.unpack_from(data, 16)
        source = (socket.inet_ntop(socket.AF_INET, s), sport)
        destination = (socket.inet_ntop(socket.AF_INET, d), dport)
    elif family == "TCP6":
        s, d, sport, dport = _IPV6_BLOCK.unpack_from(data, 16)
        source = (socket.inet_ntop(socket.AF_INET6, s), sport)
        destination = (socket.inet_ntop(socket.AF_INET6, d), dport)
    elif family == "UNIX":
        s, d = _UNIX_BLOCK.unpack_from(data, 16)
        source, destination = s.rstrip(b"\x00"), d.rstrip(b"\x00")
    return ProxyHeader(2, "PROXY", family, protocol, source, destination,
                       _tlvs(data, V2_FIXED_LENGTH + size, length), length)


def _tlvs(data: Union[bytes, bytearray], offset: int, end: int) -> Tuple[Tuple[int, bytes], ...]:
    """The TLVs in ``data[offset:end]``; one turn per TLV, never a read past ``end``."""
    found = []
    while offset < end:
        if offset + 3 > end:
            raise ProxyHeaderError("bad_tlv", f"{end - offset} bytes left, a TLV needs 3")
        kind, size = _TLV_HEAD.unpack_from(data, offset)
        offset += 3
        if offset + size > end:
            raise ProxyHeaderError("bad_tlv", f"TLV {kind:#04x} of {size} bytes runs past len")
        found.append((kind, bytes(data[offset:offset + size])))
        offset += size
    return tuple(found)


# --------------------------------------------------------------------------- encoding

def encode_v1(src: Endpoint, dst: Endpoint) -> bytes:
    """The v1 line for a connection from ``src`` to ``dst`` (see the module docstring)."""
    pair = _ip_pair(src, dst)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    af, (s, sport), (d, dport) = pair
    word = "TCP4" if af == socket.AF_INET else "TCP6"
    return f"PROXY {word} {_v1_text(af, s)} {_v1_text(af, d)} {sport} {dport}\r\n".encode()


def encode_v2(src: Endpoint, dst: Endpoint, tlvs: Tlvs = ()) -> bytes:
    """A v2 PROXY header for ``src`` -> ``dst`` with optional ``(type, value)`` TLVs.

    Called by a relay thread once per connection of a ``send_proxy = "v2"`` backend.
    """
    if not tlvs and type(src) is tuple and type(dst) is tuple:
        # The common case, an IPv4 client of an IPv4 listener, in one pack (1.6 ->
        # 0.5 us).  Anything else raises in here and takes the general path, which
        # gives the same bytes (property-tested) or its own error.
        try:
            source, destination = src[0], dst[0]
            return _V2_TCP4_START + _IPV4_BLOCK.pack(
                _PACKED_V4.get(source) or _ipv4_packed(source),
                _PACKED_V4.get(destination) or _ipv4_packed(destination), src[1], dst[1])
        except (OSError, TypeError, IndexError, struct.error):
            pass
    return _encode_v2_general(src, dst, tlvs)


def _encode_v2_general(src: Endpoint, dst: Endpoint, tlvs: Tlvs) -> bytes:
    """``encode_v2`` for every family, with TLVs."""
    pair = _ip_pair(src, dst)
    if pair is not None:
        af, (s, sport), (d, dport) = pair
        if af == socket.AF_INET:
            fam, block = 0x11, _IPV4_BLOCK.pack(s, d, sport, dport)
        else:
            fam, block = 0x21, _IPV6_BLOCK.pack(s, d, sport, dport)
    elif isinstance(src, (str, bytes)) and isinstance(dst, (str, bytes)):
        fam, block = 0x31, _UNIX_BLOCK.pack(_unix_path(src), _unix_path(dst))
    else:
        fam, block = 0x00, b""
    return _v2(0x21, fam, block + _encode_tlvs(tlvs))


def encode_v2_local(tlvs: Tlvs = ()) -> bytes:
    """A v2 LOCAL header (health checks: "this connection is the proxy's own").

    Note that ``parse`` skips the block of a LOCAL header, TLVs included.
    """
    return _v2(0x20, 0x00, _encode_tlvs(tlvs))


def _v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    if len(block) > V2_MAX_LEN_FIELD:
        raise ValueError(f"v2 header block of {len(block)} bytes, at most {V2_MAX_LEN_FIELD}")
    return _HEADER_V2.pack(V2_SIGNATURE, ver_cmd, fam, len(block)) + block


def _encode_tlvs(tlvs: Tlvs) -> bytes:
    parts = []
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV type {kind} / length {len(value)} out of range")
        parts.append(_TLV_HEAD.pack(kind, len(value)) + bytes(value))
    return b"".join(parts)


def _unix_path(path: Union[str, bytes]) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > 108:
        raise ValueError(f"unix path of {len(raw)} bytes, at most 108")
    return raw  # struct pads with NULs


def _ip_pair(src: Endpoint, dst: Endpoint
             ) -> Optional[Tuple[int, Tuple[bytes, int], Tuple[bytes, int]]]:
    """``(af, (packed, port), (packed, port))`` for two IP endpoints, else ``None``."""
    if not (isinstance(src, tuple) and isinstance(dst, tuple)):
        return None
    s_af, s = _packed(src[0])
    d_af, d = _packed(dst[0])
    if s_af != d_af:
        # One IPv4 and one IPv6 (a dual-stack listener): send both as IPv6.
        if s_af == socket.AF_INET:
            s = b"\x00" * 10 + b"\xff\xff" + s
        else:
            d = b"\x00" * 10 + b"\xff\xff" + d
        s_af = socket.AF_INET6
    for port in (src[1], dst[1]):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} not in 0-65535")
    return s_af, (s, src[1]), (d, dst[1])


def _packed(ip: str) -> Tuple[int, bytes]:
    if not isinstance(ip, str):
        raise ValueError(f"{ip!r} is not an IP address literal")
    ip = ip.split("%", 1)[0]  # getpeername() of a link-local peer: "fe80::1%eth0"
    try:
        return socket.AF_INET, socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        pass
    try:
        return socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address literal") from None


def _v1_text(af: int, packed: bytes) -> str:
    """The v1 spelling: dotted decimal, or IPv6 in hexadecimal groups only.

    ``inet_ntop`` writes ``::ffff:1.2.3.4`` for mapped addresses; the spec's v1
    grammar has hexadecimal groups only, so IPv6 is spelled here (RFC 5952:
    lower case, the longest run of two or more zero groups as ``::``).
    """
    if af == socket.AF_INET:
        return socket.inet_ntop(af, packed)
    groups = struct.unpack("!8H", packed)
    best_at, best_len, at = -1, 1, -1
    for i, group in enumerate(groups):  # 8 turns
        if group == 0:
            if at < 0:
                at = i
            if i - at + 1 > best_len:
                best_at, best_len = at, i - at + 1
        else:
            at = -1
    text = [format(g, "x") for g in groups]
    if best_at < 0:
        return ":".join(text)
    return ":".join(text[:best_at]) + "::" + ":".join(text[best_at + best_len:])
