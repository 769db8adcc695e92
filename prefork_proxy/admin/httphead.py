"""A pure parser of an HTTP/1.x request head (request line and header fields).

Owned by the admin server (``admin.server``), called from its one thread; it does
no I/O and keeps no state, so it is safe anywhere.  ``parse_request_head(data,
limit)`` returns ``None`` while the head is incomplete, a ``Request`` once it is
complete, and raises ``BadRequest`` (with a short ``reason``) when the bytes
cannot become a valid head.

What it accepts (RFC 9112, strictly, for a server that only answers GET/HEAD):

- ``method SP request-target SP HTTP/d.d`` with one space between parts; the
  method a token; the target origin-form (``/path?query``), absolute-form
  (``http://host/path``) or ``*``, visible ASCII only, no fragment.
- ``HTTP/1.x`` only: another well-formed version is ``bad_version`` (answer 505).
- header fields ``name: value``: the name a token with no space before the colon
  (RFC 9112 5.1 requires rejecting it: request smuggling), the value visible
  ASCII, obs-text, SP and HTAB; leading and trailing blanks are dropped.
  Obsolete line folding (a line starting with SP/HTAB) is rejected.
- HTTP/1.1 needs exactly one ``Host`` (RFC 9112 3.2); 1.0 may omit it.
- Lines end in CRLF; a bare LF is tolerated as a line end too (RFC 9112 2.2
  allows it, and ``printf 'GET / HTTP/1.0\\n\\n' | nc`` is a fair test by hand).
  A bare CR anywhere else is rejected.  A leading empty line is not skipped.

Bounded: the head, blank line included, must fit in ``limit`` bytes; once
``data`` holds ``limit`` bytes with no end of head in them it is ``too_large``,
whatever follows.  The request line is checked as soon as its line end is in,
so garbage is refused on its first line, not at the limit.  Work is done with
``bytes.find``/``split`` and compiled regular expressions (C loops), never a
Python loop per byte; the loop per header line is capped by ``max_headers``.

Consistency (the property the tests check): for any bytes and any prefix of
them, the answer on the prefix is either "need more" or the answer on the whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

#: Default bound on a request head, blank line included.
DEFAULT_HEAD_LIMIT = 8192
#: Default bound on the number of header fields.
DEFAULT_MAX_HEADERS = 100

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(
    rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) (HTTP/([0-9])\.([0-9]))")
#: Looks like a version but is not one: decides bad_version over bad_request_line.
_ANY_VERSION = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/[0-9]+\.[0-9]+")
_HEADER = re.compile(
    rb"(" + _TCHAR + rb"+):[ \t]*((?:[\x21-\x7e\x80-\xff]"
    rb"(?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*")
_ABSOLUTE = re.compile(rb"[hH][tT][tT][pP][sS]?://[^/?]*")


class BadRequest(ValueError):
    """The bytes cannot become a valid request head; ``reason`` says why.

    Reasons: ``too_large``, ``bad_request_line``, ``bad_version``,
    ``bad_header``, ``too_many_headers``, ``bad_host``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """A complete request head.  Header names are lower-cased; values latin-1 text."""

    method: str
    target: str
    path: str
    query: str
    version: Tuple[int, int]
    headers: Tuple[Tuple[str, str], ...]
    head_length: int

    def header(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None


def _head_end(data: bytes, limit: int) -> int:
    """Length of the head (blank line included) if it ends within ``limit``, else -1.

    The head ends at the first empty line: a LF followed by LF or by CRLF.
    """
    lf_lf = data.find(b"\n\n", 0, limit)
    lf_crlf = data.find(b"\n\r\n", 0, limit)
    ends = [pos + 2 for pos in (lf_lf,) if pos >= 0] + [pos + 3 for pos in (lf_crlf,) if pos >= 0]
    return min(ends) if ends else -1


def _line(raw: bytes) -> bytes:
    """A line without its LF-terminated CR (a bare CR left inside is rejected later)."""
    return raw[:-1] if raw.endswith(b"\r") else raw


def _request_line(line: bytes) -> Tuple[str, str, str, str, Tuple[int, int]]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        if _ANY_VERSION.fullmatch(line):
            raise BadRequest("bad_version", "not HTTP/d.d")
        raise BadRequest("bad_request_line")
    method, target, _, major, minor = match.groups()
    if major != b"1":
        raise BadRequest("bad_version", f"HTTP/{major.decode()}.{minor.decode()}")
    if b"#" in target:
        raise BadRequest("bad_request_line", "fragment in target")
    if target.startswith(b"/"):
        path_query = target
    elif target == b"*":
        path_query = target
    else:
        scheme_host = _ABSOLUTE.match(target)
        if scheme_host is None:
            raise BadRequest("bad_request_line", "target form")
        path_query = target[scheme_host.end():] or b"/"
    path, _, query = path_query.partition(b"?")
    return (method.decode("ascii"), target.decode("ascii"), path.decode("ascii"),
            query.decode("ascii"), (1, int(minor)))


def parse_request_head(data: bytes, limit: int = DEFAULT_HEAD_LIMIT,
                       max_headers: int = DEFAULT_MAX_HEADERS) -> Optional[Request]:
    """Parse the head at the start of ``data``: None (need more), a Request, or BadRequest.

    Bytes after the head (a body, a pipelined request) are not looked at.
    """
    first_lf = data.find(b"\n", 0, limit)
    if first_lf >= 0:
        # Checked before the head is complete: garbage fails on its first line.
        method, target, path, query, version = _request_line(_line(data[:first_lf]))
    end = _head_end(data, limit)
    if end < 0:
        if len(data) >= limit:
            raise BadRequest("too_large", f"no end of head in {limit} bytes")
        return None
    # The head is data[:end]: request line, header lines, then the empty line.
    lines = data[first_lf + 1:end].split(b"\n")[:-2]
    if len(lines) > max_headers:
        raise BadRequest("too_many_headers", f"{len(lines)} > {max_headers}")
    headers = []
    for raw in lines:
        match = _HEADER.fullmatch(_line(raw))
        if match is None:
            raise BadRequest("bad_header")
        headers.append((match.group(1).decode("ascii").lower(),
                        match.group(2).decode("latin-1")))
    if version >= (1, 1) and sum(1 for name, _ in headers if name == "host") != 1:
        raise BadRequest("bad_host", "HTTP/1.1 needs exactly one Host")
    return Request(method, target, path, query, version, tuple(headers), end)
