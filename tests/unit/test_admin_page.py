"""The master's shared page for the admin process, and the routes that read it.

The page is tested across a real fork: a writer process republishes bodies of
changing sizes as fast as it can while this process reads; every read must be
one whole body (the sequence lock), never a torn mix.
"""

from __future__ import annotations

import json
import os
import time

from prometheus_client.parser import text_string_to_metric_families

from prefork_proxy.admin.endpoints import build_routes, serving_workers
from prefork_proxy.admin.httphead import parse_request_head
from prefork_proxy.admin.page import StatusPage
from prefork_proxy.rows import WorkerRows


def _body(n: int) -> bytes:
    return json.dumps({"n": n, "pad": "x" * (n % 5000)}).encode()


def test_a_reader_never_sees_a_torn_body_while_another_process_writes():
    page = StatusPage(capacity=64 * 1024)
    assert page.read() is None  # nothing published yet
    pid = os.fork()
    if pid == 0:  # the writer: as fast as it can for 1 s
        code = 1
        try:
            deadline, n = time.monotonic() + 1.0, 0
            while time.monotonic() < deadline:
                n += 1
                page.publish(_body(n))
            code = 0
        finally:
            os._exit(code)
    reads, seen = 0, set()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            body = page.read()
            if body is None:
                continue
            document = json.loads(body)  # a torn body would not parse or not match
            assert body == _body(document["n"])
            seen.add(document["n"])
            reads += 1
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reads > 100 and len(seen) > 10, (reads, len(seen))


def test_publish_refuses_what_does_not_fit_and_keeps_the_last():
    page = StatusPage(capacity=16)
    assert page.publish(b'{"a": 1}')
    assert not page.publish(b"x" * 17)
    assert page.read() == b'{"a": 1}'


def _get(routes, path):
    request = parse_request_head(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return routes[path](request)


def test_live_ready_status_and_metrics_from_page_and_worker_rows():
    page, board = StatusPage(), WorkerRows(capacity=8, backend_slots=8)
    routes = build_routes(page, board, os.getpid())
    assert _get(routes, "/live")[0] == 503  # never stamped
    page.beat(time.monotonic())
    assert _get(routes, "/live")[0] == 200
    page.beat(time.monotonic() - 6.0)  # the master loop stalled
    assert _get(routes, "/live")[:1] == (503,)

    now = time.monotonic()
    assert _get(routes, "/ready")[2] == b"no worker is serving\n"
    row = board.claim(now)
    board.pid[row] = 12345
    assert serving_workers(board, now) == 0  # not booted yet
    board.booted[row] = board.accepting[row] = 1
    assert serving_workers(board, now) == 1
    assert serving_workers(board, now + 10.0) == 0  # its heartbeat went silent
    assert _get(routes, "/ready")[0] == 200
    page.set_stopping()
    assert _get(routes, "/ready") == (503, "text/plain; charset=utf-8", b"stopping\n")

    assert _get(routes, "/status")[0] == 503  # nothing published
    model = {"generation": 3, "workers": [{"state": "serving"}, {"state": "draining"},
                                          {"state": "draining"}], "written_at": time.time()}
    page.publish(json.dumps(model).encode())
    code, content_type, body = _get(routes, "/status")
    served = json.loads(body)
    assert (code, content_type) == (200, "application/json")
    assert served.pop("stale_s") < 5 and served == model

    code, _, body = _get(routes, "/metrics")
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("prefork_proxy_config_generation", ())] == 3
    assert samples[("prefork_proxy_workers", (("state", "serving"),))] == 1
    assert samples[("prefork_proxy_workers", (("state", "draining"),))] == 2
    assert ("process_cpu_seconds_total", ()) in samples


def test_an_admin_process_that_keeps_dying_young_is_restarted_with_backoff():
    from prefork_proxy.admin.process import AdminEndpoint
    from prefork_proxy.config import Endpoint

    admin = AdminEndpoint.open(Endpoint("127.0.0.1", 0))
    try:
        delays = []
        now = 1000.0
        for _ in range(5):
            admin.pid, admin._started_at = 4242, now
            assert not admin.reaped(4243, now)  # not ours: a worker or an orphan
            assert admin.reaped(4242, now + 0.1) and admin.pid == 0
            delays.append(round(admin._restart_at - (now + 0.1), 3))
            now += 1.0
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
        admin.pid, admin._started_at = 4242, now
        admin.reaped(4242, now + 60.0)  # lived a minute: back to the first delay
        assert admin._restart_at - (now + 60.0) == 0.5
    finally:
        admin.close()


def test_the_stopping_flag_is_set_before_handshakes_stop():
    """Master._stop's order: /ready says 503 before the listeners stop taking handshakes."""
    import signal

    from prefork_proxy import config
    from prefork_proxy.master import Master

    calls = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *args: calls.append(name)

    master = Master(config.load_text('[[tcp_proxy]]\nbind = "127.0.0.1:0"\n'
                                     'backends = ["127.0.0.1:9"]\n'))
    master.admin, master.listeners = Recorder(), Recorder()
    master._stop(signal.SIGTERM, 1.0)
    assert calls.index("set_stopping") < calls.index("stop_new_handshakes")
