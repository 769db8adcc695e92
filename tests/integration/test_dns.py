"""Names and DNS never break serving: slow, failing and large answers, end to end.

The real CLI with real backends on loopback.  DNS answers come from the test
hook ``PREFORK_PROXY_TEST_DNS`` (``health.fake_getaddrinfo``): names ending in
``.test`` resolve to chosen loopback addresses, after a chosen delay, or fail
with a chosen error, in every process of the proxy.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time

from backend_clients import run_clients
from support import free_port, recv_exactly, transform, wait_for, write_config


def _dns(**names: dict) -> dict:
    return dict(os.environ, PREFORK_PROXY_TEST_DNS=json.dumps(
        {name.replace("_", "-") + ".test": answer for name, answer in names.items()}))


def test_slow_dns_stalls_no_other_connection_and_the_name_serves_once_resolved(
        backend_factory, proxy_factory, tmp_path):
    """A 4 s lookup: another listener of the same (only) relay thread answers meanwhile
    in under 50 ms (median; the worst one well under the 4 s a blocked relay thread would
    take, with room for a loaded CI machine), and a client of the named listener waits,
    then is served."""
    a, echo = backend_factory("tag", "A"), backend_factory("echo")
    config = write_config(tmp_path / "p.toml", f"""
[server]
workers = 1
threads = 1

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["slow.test:{a.port}"]
connect_timeout_ms = 10000

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["{echo.address}"]
""")
    proxy = proxy_factory("start", "--config", str(config),
                          env=_dns(slow={"delay_s": 4, "addresses": ["127.0.0.1"]}))
    resolved = f"backend slow.test:{a.port} resolves to 127.0.0.1"
    started = time.monotonic()
    waiting = socket.create_connection(("127.0.0.1", proxy.port(0)), timeout=15)
    times: list = []
    try:
        while resolved not in proxy.log and time.monotonic() - started < 10:
            # Each round: a new client, so the accept and the backend choice run on
            # the relay thread too, as for the waiting client.
            began = time.monotonic()
            with socket.create_connection(("127.0.0.1", proxy.port(1)), timeout=5) as sock:
                message = b"ping %d" % len(times)
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == transform(message)
            times.append(time.monotonic() - began)
            time.sleep(0.02)  # pacing only: each round is measured on its own
        assert resolved in proxy.log
        took = time.monotonic() - started
        rounds, worst, median = len(times), max(times), statistics.median(times)
        print(f"\nslow DNS (4 s): {rounds} round trips on the other listener meanwhile, "
              f"median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms; the name "
              f"resolved after {took:.1f} s")
        assert median < 0.05, median
        assert worst < 1.0, worst
        assert took >= 3.5 and rounds >= 50, (took, rounds)  # they did overlap the lookup
        assert waiting.makefile("rb").readline() == b"A\n"  # served once resolved
    finally:
        waiting.close()
    assert "connect budget" not in proxy.log and "no backend address known" not in proxy.log


def test_a_name_whose_lookup_raises_any_error_costs_no_client(backend_factory, proxy_factory,
                                                              tmp_path):
    """UnicodeError (what a bad IDNA label raises) and RuntimeError from the resolver: the
    name stays unresolved, the other backend serves every client, lookups go on."""
    a = backend_factory("tag", "A")
    for balance in ("round_robin", "least_conn"):
        config = write_config(tmp_path / f"{balance}.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["idna.test:1", "boom.test:1", "{a.address}"]
balance = "{balance}"
resolve_interval_ms = 100
""")
        proxy = proxy_factory("start", "--config", str(config),
                              env=_dns(idna={"error": "UnicodeError"},
                                       boom={"error": "RuntimeError"}))
        wait_for(lambda p=proxy: "UnicodeError: UnicodeError for idna.test" in p.log
                 and "RuntimeError: RuntimeError for boom.test" in p.log,
                 message="both failures logged")
        names, failures, _ = run_clients(proxy.port(), 40, threads=4)
        assert failures == 0 and set(names) == {"A"}, (balance, names, failures)
        # Logged once per new error, not once per lookup (every 100 ms), and the
        # resolver thread lived through it.
        time.sleep(0.5)  # several resolve intervals, to count the warnings they log
        assert proxy.log.count("cannot resolve: UnicodeError") == 1
        assert "resolver thread" not in proxy.log
        proxy.stop()


def test_every_address_of_a_large_answer_gets_traffic(backend_factory, proxy_factory,
                                                       tmp_path):
    """12 addresses (a name used to keep the first 8, sorted as strings): round robin
    sends every one of them its exact share."""
    port = free_port()
    hosts = [f"127.0.0.{i}" for i in range(1, 13)]
    for i, host in enumerate(hosts):
        backend_factory("tag", f"B{i + 1}", "--host", host, "--port", str(port))
    config = write_config(tmp_path / "p.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["many.test:{port}"]
""")
    proxy = proxy_factory("start", "--config", str(config),
                          env=_dns(many={"addresses": list(reversed(hosts))}))
    wait_for(lambda: f"many.test:{port} resolves to" in proxy.log, message="the name resolved")
    line = next(x for x in proxy.log.splitlines() if f"many.test:{port} resolves to" in x)
    assert line.endswith("resolves to " + ", ".join(hosts))  # every one, in numeric order
    names, failures, _ = run_clients(proxy.port(), 48, threads=1)
    assert failures == 0 and names == {f"B{i}": 4 for i in range(1, 13)}, names
    assert "more than the" not in proxy.log  # 12 fit: no subset, no warning
