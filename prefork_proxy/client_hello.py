"""Reading the TLS ClientHello a client sends first: the one module that owns it.

A pure function over the bytes received so far, for routing TLS by server name
without terminating it (nginx ``ssl_preread``, HAProxy ``req.ssl_sni``, Envoy's
``tls_inspector``).  It holds no state, opens nothing and imports only the
standard library, so any thread of any process may call it; the connection
that owns the bytes (the SNI step of the pre-connect phase,
``admission.steps.SniStep``, on a worker's relay thread, compiled by ``gate``
for every listener with ``[[tcp_proxy.routes]]``) calls it again each time more
bytes arrive, and forwards every byte it read to
the chosen backend unchanged.

``read_client_hello(data)`` answers one of three ways:

- ``NeedMore(at_least)``: ``data`` is a valid beginning, and no hello can be
  complete before at least ``at_least`` more bytes arrive (a lower bound: the
  rest of the hello when its length is known, plus one record header when the
  current record ends first).  Calling again only once that many bytes have
  arrived keeps a client that trickles tiny records from costing a parse per
  byte; a rejection in those bytes is then seen when they have all arrived.
- a ``ClientHello``: the server name (as sent, and normalized), the ALPN
  protocol list, the versions, and ``consumed``: where the hello ended in
  ``data`` (record headers included).  Bytes after it (0-RTT data, say) are
  never looked at.
- ``ClientHelloError`` with a short ``reason`` (``not_tls``, ``sslv2``,
  ``bad_record``, ``bad_handshake``, ``bad_server_name``, ``bad_alpn``,
  ``too_large``, ``too_fragmented``): the connection is not a TLS client or
  its hello is malformed; a proxy refuses it (or routes it to a default) and
  logs the reason.  Nothing else is ever raised, whatever the bytes.

Wire formats read (RFC 8446 sections 4.1.2 and 5.1, RFC 5246 section 7.4.1.2):

    record     = type(1)=22  version(2)=0x03xx  length(2)  fragment(length)
    handshake  = msg_type(1)=1  length(3)  body(length)   (may span records)
    body       = legacy_version(2) random(32) session_id<0..32>
                 cipher_suites<2..2^16-2> compression_methods<1..2^8-1>
                 [extensions<0..2^16-1>]          (may be absent before TLS 1.3)
    extension  = type(2) data<0..2^16-1>
    server_name (0, RFC 6066)  = list<1..2^16-1> of name_type(1) name<1..2^16-1>
    alpn (16, RFC 7301)        = list<2..2^16-1> of name<1..2^8-1>
    supported_versions (43)    = list<2..254> of version(2)

Every length field is checked against the one that encloses it before
anything inside it is read: a length that claims more than its container, or a
container with bytes left over, is a rejection, not a read past the end.  All
reads are ``struct.unpack_from`` and slices; the only Python loops are over
records, extensions, server names and ALPN names (each bounded by a count
below), never over bytes.

Cost: a hello is parsed completely only once (when all of it has arrived);
until then each call reads record headers only.  Measured on this 2-core
machine (timeit, best of 5): 10-17 us for a real 240-1,208-byte hello
(curl, openssl, Python ssl), 2-3 us for a 9-byte prefix or an HTTP request;
the worst hostile 16 KiB the bounds below allow costs under 75 us.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

#: The largest record fragment a TLS peer may send (RFC 8446 section 5.1: 2^14).
MAX_RECORD_PAYLOAD = 16384
RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
#: What the reader is ever willing to buffer: the hello and all its record
#: headers must fit in one maximal record's worth plus one header.  A hello that
#: needs more is refused ("too_large") as soon as its length says so.
MAX_BUFFER = MAX_RECORD_PAYLOAD + RECORD_HEADER
#: Bounds on the few Python loops, so a hostile 16 KiB costs what a real hello
#: does: real clients send their hello in one record (a few anti-censorship
#: tools split it in a handful), about 20 extensions, fewer than 10 ALPN names.
#: Without them, 16 KiB of one-byte records costs 2.2 ms per call and an ALPN
#: list of 8,000 one-byte names 2.6 ms (measured on this 2-core machine).
MAX_RECORDS = 64
MAX_EXTENSIONS = 128
MAX_LIST_ENTRIES = 64

CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
NAME_TYPE_HOST_NAME = 0

_U16 = struct.Struct(">H")
_RECORD = struct.Struct(">BBBH")  # type, version major, version minor, length
_HS_LEN = struct.Struct(">I")  # msg_type in the top byte, length in the low three
_EXT_HEADER = struct.Struct(">HH")  # type, length

# A host name goes into logs and route lookups: printable ASCII without space,
# at most 255 bytes.  Checked by one C-level regex match, not a byte loop.
_HOST_NAME_OK = re.compile(rb"[\x21-\x7e]{1,255}\Z")


class ClientHelloError(ValueError):
    """The bytes are not a TLS ClientHello this reader accepts.

    ``reason`` is one short token meant for a log field (``reason=not_tls``);
    ``str()`` adds what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NeedMore:
    """``data`` is a valid beginning; at least ``at_least`` more bytes are needed."""

    at_least: int


@dataclass(frozen=True)
class ClientHello:
    """What a router needs from a complete ClientHello.

    ``server_name`` is the first host_name exactly as sent (ASCII), or None when
    the hello has no server_name extension; ``server_name_normalized`` is it
    lowercased with one trailing dot removed, the form routes are matched on.
    ``alpn`` is the protocol list in the client's order, as the opaque bytes
    sent (empty when the extension is absent).  ``supported_versions`` is the
    list of the TLS 1.3 extension (empty when absent); ``legacy_version`` is the
    version field of the hello itself (0x0303 for TLS 1.2 and 1.3 clients).
    ``consumed`` is the number of bytes of ``data`` the hello occupied, record
    headers included; ``records`` how many records carried it.
    """

    server_name: Optional[str]
    server_name_normalized: Optional[str]
    alpn: Tuple[bytes, ...]
    legacy_version: int
    supported_versions: Tuple[int, ...]
    consumed: int
    records: int

    @property
    def max_version(self) -> int:
        """The highest version offered: from supported_versions when sent."""
        if self.supported_versions:
            # GREASE values (0x?a?a) are never a real version: skip them.
            real = [v for v in self.supported_versions if v & 0x0F0F != 0x0A0A]
            if real:
                return max(real)
        return self.legacy_version


Result = Union[ClientHello, NeedMore]


def read_client_hello(data: Union[bytes, bytearray, memoryview]) -> Result:
    """Read the ClientHello at the start of ``data`` (the bytes received so far).

    Returns ``NeedMore`` or a ``ClientHello``; raises ``ClientHelloError`` and
    nothing else.  ``data`` is not modified and nothing past the hello is read.
    """
    if type(data) is not bytes:
        # A copy of what may matter (at most MAX_BUFFER bytes): no view of the
        # caller's bytearray outlives this call, so it stays resizable.
        with memoryview(data) as whole:
            data = whole[:MAX_BUFFER].tobytes()
    view = memoryview(data)
    size = len(view)
    if size == 0:
        return NeedMore(RECORD_HEADER)
    _check_first_bytes(view, size)

    # Walk the records, gathering handshake fragments, until the hello's length
    # is known and that many bytes are gathered.  Each record header is checked
    # before its payload is used; a record still arriving ends the walk.
    pieces = []
    gathered = 0  # handshake bytes gathered so far, across records
    hello_total = -1  # 4 + the handshake length, once its header is gathered
    offset = 0
    records = 0
    while True:
        # Handshake bytes still missing: the rest of the hello, or of its header.
        missing = (hello_total if hello_total >= 0 else HANDSHAKE_HEADER) - gathered
        if offset + RECORD_HEADER > size:
            return NeedMore(offset + RECORD_HEADER - size + missing)
        ctype, major, _minor, length = _RECORD.unpack_from(view, offset)
        if ctype != CONTENT_HANDSHAKE:
            raise ClientHelloError(
                "bad_record", f"record {records + 1} has content type {ctype} inside the hello"
            )
        if major != 3:
            raise ClientHelloError("bad_record", f"record {records + 1} version major {major}")
        if length == 0:
            # RFC 8446 5.1: zero-length handshake fragments MUST NOT be sent.
            raise ClientHelloError("bad_record", f"record {records + 1} is empty")
        if length > MAX_RECORD_PAYLOAD:
            raise ClientHelloError(
                "too_large", f"record {records + 1} claims {length} > {MAX_RECORD_PAYLOAD} bytes"
            )
        records += 1
        if records > MAX_RECORDS:
            raise ClientHelloError(
                "too_fragmented", f"hello spread over more than {MAX_RECORDS} records"
            )
        before = gathered  # handshake bytes in earlier records
        start = offset + RECORD_HEADER
        present = min(length, size - start)  # of this record's payload
        take = present if hello_total < 0 else min(present, missing)
        piece = view[start : start + take]
        pieces.append(piece)
        gathered += take
        if records == 1 and take and piece[0] != HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError(
                "bad_handshake", f"handshake message type {piece[0]} is not client_hello"
            )
        if hello_total < 0 and gathered >= HANDSHAKE_HEADER:
            hello_total = _hello_total(pieces)
            if gathered > hello_total:  # this record holds more than the hello
                take -= gathered - hello_total
                pieces[-1] = piece[:take]
                gathered = hello_total
        if hello_total >= 0:
            # The least the whole hello costs to buffer: the record headers so
            # far, one more if this record ends before the hello does, and the
            # hello.  Refused as soon as the lengths say so, not 16 KiB later.
            headers = records + (before + length < hello_total)
            if headers > MAX_RECORDS:
                raise ClientHelloError(
                    "too_fragmented", f"hello needs more than {MAX_RECORDS} records"
                )
            if RECORD_HEADER * headers + hello_total > MAX_BUFFER:
                raise ClientHelloError(
                    "too_large",
                    f"hello of {hello_total} bytes in {headers}+ records exceeds {MAX_BUFFER}",
                )
        missing = (hello_total if hello_total >= 0 else HANDSHAKE_HEADER) - gathered
        if missing == 0:
            consumed = start + take
            break
        if present < length:  # this record is still arriving
            rest = length - present
            # Either the hello ends inside this record, or the record ends
            # first and at least one more record header must follow.
            return NeedMore(missing if missing <= rest else missing + RECORD_HEADER)
        offset = start + length

    body = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
    return _parse_body(body[HANDSHAKE_HEADER:], consumed, records)


def _check_first_bytes(view: memoryview, size: int) -> None:
    """Refuse early what cannot be TLS, from the first two bytes alone."""
    first = view[0]
    if first != CONTENT_HANDSHAKE:
        if first & 0x80:
            # SSLv2-compatible hello: a 2-byte length with the high bit set.
            raise ClientHelloError("sslv2", "SSLv2-style record header (high bit set)")
        raise ClientHelloError("not_tls", f"first byte {first:#04x} is not a TLS handshake record")
    if size >= 2 and view[1] != 3:
        raise ClientHelloError("not_tls", f"record version major {view[1]} is not 3")


def _hello_total(fragments: list) -> int:
    """4 + the handshake length, from the first 4 gathered bytes (maybe split)."""
    head = fragments[0][:HANDSHAKE_HEADER]
    if len(head) < HANDSHAKE_HEADER:  # the handshake header spans records
        head = b"".join(fragments)[:HANDSHAKE_HEADER]
    word = _HS_LEN.unpack_from(head)[0]
    if word >> 24 != HANDSHAKE_CLIENT_HELLO:
        raise ClientHelloError(
            "bad_handshake", f"handshake message type {word >> 24} is not client_hello"
        )
    length = word & 0xFFFFFF
    # legacy_version + random + three length bytes is the least a hello can be.
    if length < 2 + 32 + 1 + 2 + 1:
        raise ClientHelloError("bad_handshake", f"hello length {length} is too short")
    return HANDSHAKE_HEADER + length


def _vector(body: memoryview, pos: int, width: int, what: str) -> Tuple[memoryview, int]:
    """The vector with a ``width``-byte length at ``pos``, and the position after it."""
    end = len(body)
    if pos + width > end:
        raise ClientHelloError("bad_handshake", f"{what} length runs past the hello")
    if width == 1:
        length = body[pos]
    else:
        length = _U16.unpack_from(body, pos)[0]
    pos += width
    if pos + length > end:
        raise ClientHelloError(
            "bad_handshake", f"{what} claims {length} bytes, {end - pos} left in the hello"
        )
    return body[pos : pos + length], pos + length


def _parse_body(body: memoryview, consumed: int, records: int) -> ClientHello:
    legacy_version = _U16.unpack_from(body, 0)[0]
    pos = 2 + 32  # version, random
    session_id, pos = _vector(body, pos, 1, "session_id")
    if len(session_id) > 32:
        raise ClientHelloError("bad_handshake", f"session_id of {len(session_id)} bytes > 32")
    suites, pos = _vector(body, pos, 2, "cipher_suites")
    if len(suites) < 2 or len(suites) % 2:
        raise ClientHelloError("bad_handshake", f"cipher_suites of {len(suites)} bytes")
    compression, pos = _vector(body, pos, 1, "compression_methods")
    if not compression:
        raise ClientHelloError("bad_handshake", "no compression method")

    server_name: Optional[str] = None
    alpn: Tuple[bytes, ...] = ()
    versions: Tuple[int, ...] = ()
    if pos < len(body):  # extensions are optional before TLS 1.3
        extensions, pos = _vector(body, pos, 2, "extensions")
        if pos != len(body):
            raise ClientHelloError("bad_handshake", f"{len(body) - pos} bytes after the extensions")
        seen = set()
        epos = 0
        elen = len(extensions)
        while epos < elen:
            if len(seen) == MAX_EXTENSIONS:
                raise ClientHelloError("bad_handshake", f"more than {MAX_EXTENSIONS} extensions")
            if epos + 4 > elen:
                raise ClientHelloError("bad_handshake", "extension header runs past the list")
            etype, length = _EXT_HEADER.unpack_from(extensions, epos)
            epos += 4
            if epos + length > elen:
                raise ClientHelloError(
                    "bad_handshake",
                    f"extension {etype} claims {length} bytes, {elen - epos} left",
                )
            # RFC 8446 4.2: at most one extension of each type.  A second
            # server_name could route to one backend and be read by another.
            if etype in seen:
                raise ClientHelloError("bad_handshake", f"extension {etype} sent twice")
            seen.add(etype)
            if etype == EXT_SERVER_NAME:
                server_name = _server_name(extensions[epos : epos + length])
            elif etype == EXT_ALPN:
                alpn = _alpn(extensions[epos : epos + length])
            elif etype == EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(extensions[epos : epos + length])
            epos += length

    normalized = None
    if server_name is not None:
        normalized = normalize_server_name(server_name)
        if not normalized:
            raise ClientHelloError("bad_server_name", f"server name {server_name!r} is empty")
    return ClientHello(
        server_name=server_name,
        server_name_normalized=normalized,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        consumed=consumed,
        records=records,
    )


def _server_name(data: memoryview) -> Optional[str]:
    """The first host_name of a server_name extension (RFC 6066 section 3)."""
    try:
        names, pos = _vector(data, 0, 2, "server_name list")
        if pos != len(data) or not names:
            raise ClientHelloError("bad_server_name", "server_name list length does not fit")
        npos = 0
        host: Optional[str] = None
        count = 0
        while npos < len(names):
            count += 1
            if count > MAX_LIST_ENTRIES:
                raise ClientHelloError("bad_server_name", f"more than {MAX_LIST_ENTRIES} names")
            name_type = names[npos]
            name, npos = _vector(names, npos + 1, 2, "server name")
            if name_type == NAME_TYPE_HOST_NAME and host is None:
                host = _host_name(bytes(name))
    except ClientHelloError as exc:
        raise ClientHelloError("bad_server_name", exc.detail) from None
    return host


def _host_name(raw: bytes) -> str:
    if not _HOST_NAME_OK.match(raw):
        raise ClientHelloError(
            "bad_server_name", f"host name {raw[:64]!r} is not printable ASCII (1-255)"
        )
    return raw.decode("ascii")


def _alpn(data: memoryview) -> Tuple[bytes, ...]:
    """The protocol names of an ALPN extension (RFC 7301 section 3.1), in order."""
    try:
        protocols, pos = _vector(data, 0, 2, "ALPN list")
    except ClientHelloError as exc:
        raise ClientHelloError("bad_alpn", exc.detail) from None
    if pos != len(data) or len(protocols) < 2:
        raise ClientHelloError("bad_alpn", "ALPN list length does not fit")
    result = []
    ppos = 0
    while ppos < len(protocols):
        if len(result) == MAX_LIST_ENTRIES:
            raise ClientHelloError("bad_alpn", f"more than {MAX_LIST_ENTRIES} protocols")
        length = protocols[ppos]
        ppos += 1
        if length == 0 or ppos + length > len(protocols):
            raise ClientHelloError("bad_alpn", f"protocol name of {length} bytes does not fit")
        result.append(bytes(protocols[ppos : ppos + length]))
        ppos += length
    return tuple(result)


def _supported_versions(data: memoryview) -> Tuple[int, ...]:
    versions, pos = _vector(data, 0, 1, "supported_versions")
    if pos != len(data) or not versions or len(versions) % 2:
        raise ClientHelloError("bad_handshake", "supported_versions length does not fit")
    return struct.unpack_from(f">{len(versions) // 2}H", versions)


def normalize_server_name(name: str) -> str:
    """The form server names are compared in: lowercase, one trailing dot removed."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name
