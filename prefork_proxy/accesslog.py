"""The access log: one line per finished connection (issue 11), written off the relay threads.

Owns the record's meaning (``RECORD_FIELDS``), the two line formats (pure
functions: ``logfmt_line``, ``json_line``) and ``AccessLog``, the per-worker
writer.  The relay loops append one tuple per connection at its close to the
worker's ``AccessLog.queue`` (``RelayLoop._record``: a ``collections.deque``,
whose appends are atomic, so no lock, no formatting and no I/O on a relay
thread); the worker's main thread calls ``flush`` every ``FLUSH_S`` (and at
the end of a stop, and before a SIGUSR1 reopen), which formats what is queued
and writes it with one ``write`` per batch.  Bounded: past ``MAX_QUEUED``
records the oldest are dropped (the deque's ``maxlen``) and counted, with a
warning at most once per ``WARN_EVERY_S``, so a stalled disk cannot exhaust
memory.

Principle (no line lost or doubled at a reopen): ``reopen`` first flushes the
queue to the old file, then opens the path again and closes the old
descriptor; the file is opened with ``O_APPEND``, so every worker's batches
land whole at the end of the same file.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import time
from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Sequence, Tuple

log = logging.getLogger("prefork_proxy.accesslog")

#: What each item of a record tuple is (``RelayLoop._record`` builds them in this order).
RECORD_FIELDS = ("started", "listener_slot", "client", "backend", "upstream", "attempts",
                 "status", "term", "reason", "connect_s", "duration_s", "client_in",
                 "client_out", "backend_in", "backend_out", "sni")
#: How often the worker's main thread writes what is queued.
FLUSH_S = 0.15
#: Records queued at most; past it the oldest are dropped (and counted).
MAX_QUEUED = 100_000
#: At most one "records dropped" warning this often.
WARN_EVERY_S = 10.0
FORMATS = ("logfmt", "json")

Record = Tuple[Any, ...]
Fields = List[Tuple[str, Any]]


def address_text(address: object) -> str:
    """``ip:port`` (``[v6]:port``) for a socket address, the text of anything else, ``-``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in str(host) else f"{host}:{address[1]}"
    if isinstance(address, bytes):
        return address.decode("utf-8", "backslashreplace") or "-"
    return str(address) if address not in (None, "") else "-"


#: The last whole second ``iso_utc`` formatted and its text (a batch's lines mostly
#: share their second; the worker's main thread is the only caller).
_last_second: List[Any] = [None, ""]


def iso_utc(wall: float) -> str:
    """ISO 8601 UTC with milliseconds: ``2026-12-02T08:52:53.123Z``."""
    seconds = int(wall)
    if _last_second[0] != seconds:
        _last_second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return f"{_last_second[1]}.{int((wall - seconds) * 1000):03d}Z"


def record_fields(record: Record, wall_offset: float, listener: str, worker: int, pid: int,
                  conn_id: str) -> Fields:
    """The fields of one line, in order (values are str or int; None: not applicable).

    ``wall_offset`` = ``time.time() - time.monotonic()``: turns the record's
    monotonic start into the wall clock.
    """
    (started, _, client, backend, upstream, attempts, status, term, reason, connect_s,
     duration_s, client_in, client_out, backend_in, backend_out, sni) = record
    return [
        ("ts", iso_utc(started + wall_offset)),
        ("listener", listener),
        ("worker", worker),
        ("pid", pid),
        ("conn", conn_id),
        ("client", address_text(client)),
        ("backend", backend or "-"),
        ("upstream", upstream or "-"),
        ("attempts", attempts),
        ("status", status),
        ("term", term),
        ("reason", reason or "-"),
        ("connect_ms", round(connect_s * 1000, 3) if connect_s >= 0 else "-"),
        ("duration_ms", round(duration_s * 1000, 3)),
        ("client_in", client_in),
        ("client_out", client_out),
        ("backend_in", backend_in),
        ("backend_out", backend_out),
        ("sni", sni or "-"),
    ]


#: A character that makes a logfmt value need quotes: anything outside printable ASCII
#: (spaces and control characters included), a quote, ``=`` or a backslash.
_NEEDS_QUOTES = re.compile(r'[^\x21-\x7e]|["=\\]')


def _logfmt_value(value: Any) -> str:
    # Ints (most fields) never need quotes; one regex search decides for text: the
    # per-character generator this replaced was most of a line's ~24 us.
    if type(value) is int:
        return str(value)
    text = str(value)
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return json.dumps(text)  # quoted, with \" \\ and control characters escaped


def logfmt_line(fields: Fields) -> str:
    """``key=value`` pairs; a value with a space, quote, ``=`` or backslash is quoted."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields) + "\n"


def json_line(fields: Fields) -> str:
    """One JSON object per line; ``-`` placeholders become null."""
    return json.dumps({key: (None if value == "-" else value) for key, value in fields},
                      separators=(",", ":")) + "\n"


FORMATTERS: Mapping[str, Callable[[Fields], str]] = {"logfmt": logfmt_line, "json": json_line}


class AccessLog:
    """One worker's access log: its queue, its file, its writer (see the module docstring).

    Built by the worker at boot (in the child); ``queue`` is handed to every
    relay loop; everything else runs on the worker's main thread.
    ``appended`` is a callable summing the loops' ``access_appended``
    counters, for counting drops.
    """

    def __init__(self, path: str, fmt: str, worker: int, listeners: Dict[int, str],
                 appended: Callable[[], int] = lambda: 0) -> None:
        if fmt not in FORMATTERS:
            raise ValueError(f"access_log_format must be one of {FORMATS}, not {fmt!r}")
        self.path = path
        self.queue: Deque[Record] = collections.deque(maxlen=MAX_QUEUED)
        self._format = FORMATTERS[fmt]
        self._worker = worker
        self._pid = os.getpid()
        self._listeners = listeners  # listener slot -> its label
        self._appended = appended
        self._taken = 0  # records taken from the queue so far
        self._sequence = 0  # the connection ids' counter
        self.dropped = 0
        self._warned_at = -WARN_EVERY_S
        self._fd = self._open()

    def _open(self) -> int:
        if self.path == "-":
            return 2
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def flush(self) -> int:
        """Format and write everything queued now; return how many lines.  Never raises."""
        try:
            return self._flush()
        except Exception:  # a log must never cost the worker its connections
            log.exception("writing the access log %s failed", self.path)
            return 0

    def _flush(self) -> int:
        appended = self._appended()  # read before the queue: drops are never overcounted
        queue = self.queue
        lines: List[str] = []
        offset = time.time() - time.monotonic()
        listeners, worker, pid, fmt = self._listeners, self._worker, self._pid, self._format
        while queue:
            record = queue.popleft()
            self._sequence += 1
            lines.append(fmt(record_fields(record, offset, listeners.get(record[1], "?"),
                                           worker, pid, f"{pid}-{self._sequence}")))
        self._taken += len(lines)
        self._count_drops(appended)
        if lines:
            self._write("".join(lines).encode("utf-8", "backslashreplace"))
        return len(lines)

    def _count_drops(self, appended: int) -> None:
        dropped = appended - self._taken - len(self.queue)
        if dropped > self.dropped:
            self.dropped = dropped
            now = time.monotonic()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("access log %s: %d record(s) dropped so far (the queue of %d was "
                            "full: the disk is too slow)", self.path, dropped, MAX_QUEUED)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def reopen(self) -> None:
        """SIGUSR1: write what is queued to the current file, then reopen the path."""
        self.flush()
        if self.path == "-":
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("cannot reopen the access log %s (%s); still writing to the old file",
                      self.path, exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        log.info("worker %d: access log %s reopened", self._worker, self.path)

    def close(self) -> None:
        """The end of the worker: write everything left, then close the file."""
        self.flush()
        if self._fd != 2:
            os.close(self._fd)
            self._fd = -1


def lines(records: Iterable[Record], fmt: str = "logfmt", listener: str = "l",
          worker: int = 0, pid: int = 1, wall_offset: float = 0.0) -> Sequence[str]:
    """Format records as ``AccessLog`` would (for tests and tools)."""
    format_line = FORMATTERS[fmt]
    return [format_line(record_fields(r, wall_offset, listener, worker, pid, f"{pid}-{n}"))
            for n, r in enumerate(records, 1)]
