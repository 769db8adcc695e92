"""The access log's pure formatting (``prefork_proxy.accesslog``): logfmt quoting, json."""

from __future__ import annotations

import json

from prefork_proxy.accesslog import address_text, iso_utc, lines, logfmt_line

RECORD = (100.0, 0, ("127.0.0.1", 4242), "b1:80", "b0:80,b1:80", 2, 200, "--", "", 0.0015,
          2.5, 10, 20, 21, 11, None)


def test_logfmt_quotes_spaces_quotes_equals_and_backslashes():
    line = logfmt_line([("a", "plain"), ("b", 'say "hi" now'), ("c", "x=y"), ("d", "a\\b"),
                        ("e", ""), ("f", 7), ("g", "tab\there")])
    assert line == ('a=plain b="say \\"hi\\" now" c="x=y" d="a\\\\b" e="" f=7 '
                    'g="tab\\there"\n')


def test_record_in_both_formats():
    (text,) = lines([RECORD], "logfmt", listener="front door", worker=1, pid=99,
                    wall_offset=1_700_000_000.0)
    assert text == ('ts=2023-11-14T22:15:00.000Z listener="front door" worker=1 pid=99 '
                    "conn=99-1 client=127.0.0.1:4242 backend=b1:80 upstream=b0:80,b1:80 "
                    "attempts=2 status=200 term=-- reason=- connect_ms=1.5 duration_ms=2500.0 "
                    "client_in=10 client_out=20 backend_in=21 backend_out=11 sni=-\n")
    (text,) = lines([RECORD], "json", listener="front", worker=1, pid=99)
    record = json.loads(text)
    assert record["client"] == "127.0.0.1:4242" and record["sni"] is None
    assert record["reason"] is None and record["attempts"] == 2 and record["term"] == "--"


def test_not_connected_and_addresses():
    refused = (0.0, 0, "10.0.0.1:5", None, "b0:80", 1, 502, "SC", "connect_refused", -1.0,
               0.001, 0, 0, 0, 0, "example.com")
    record = json.loads(lines([refused], "json")[0])
    assert record["connect_ms"] is None and record["backend"] is None
    assert record["sni"] == "example.com"
    assert address_text(("::1", 80, 0, 0)) == "[::1]:80"
    assert address_text(b"/run/x.sock") == "/run/x.sock" and address_text("") == "-"
    assert iso_utc(0.9999) == "1970-01-01T00:00:00.999Z"


def test_writer_drops_oldest_when_full_counts_them_and_reopens(tmp_path, monkeypatch):
    """Bounded queue (oldest dropped, counted); a reopen flushes to the old file first."""
    from prefork_proxy import accesslog
    monkeypatch.setattr(accesslog, "MAX_QUEUED", 5)
    path = tmp_path / "access.log"
    appended = [0]
    writer = accesslog.AccessLog(str(path), "json", 0, {0: "front"}, lambda: appended[0])
    for n in range(8):  # as the relay does: append, count
        writer.queue.append(RECORD[:9] + (n,) + RECORD[10:])
        appended[0] += 1
    assert writer.flush() == 5 and writer.dropped == 3
    kept = [json.loads(line)["connect_ms"] for line in path.read_text().splitlines()]
    assert kept == [3000, 4000, 5000, 6000, 7000]  # the oldest three went
    writer.queue.append(RECORD)
    appended[0] += 1
    path.rename(tmp_path / "access.log.1")
    writer.reopen()  # the queued record goes to the renamed file
    writer.queue.append(RECORD)
    appended[0] += 1
    writer.close()
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 6
    assert len(path.read_text().splitlines()) == 1 and writer.dropped == 3
