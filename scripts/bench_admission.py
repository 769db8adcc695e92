"""Per-connection cost of the admission parts: ACL lookups, limits, and the whole pipeline.

    .venv/bin/python scripts/bench_admission.py [--pipeline-only]

The pipeline part is the CPU a relay thread spends per connection in
``prefork_proxy.admission``: ``open`` + ``start`` + ``feed`` (one read holding
the PROXY header and 64 bytes of stream, or a ClientHello) + ``release``,
against no pipeline (the relay's one ``is None`` test).  Median of 21 rounds of
2,000 connections, ``time.process_time`` (CPU, not wall), in µs.

Single process, no contention: the cost a relay thread pays per accepted
connection (the best of 5 repeats, in µs).  Under contention the record lock
also serializes workers for the time it is held.
"""

from __future__ import annotations

import ipaddress
import os
import random
import statistics
import sys
import time
import timeit
from pathlib import Path

from prefork_proxy import proxy_protocol
from prefork_proxy.acl import compile_acl
from prefork_proxy.admission import compile_pipeline
from prefork_proxy.limits import ConnectionLimits, RecordLock
from prefork_proxy.shared import ProcessLock
from prefork_proxy.sni_routes import ServerNameTable


def _rules(count: int, rng: random.Random) -> list:
    rules: set = set()
    while len(rules) < count:
        if rng.random() < 0.5:
            rules.add(str(ipaddress.IPv4Network((rng.getrandbits(24) << 8, 24))))
        else:
            rules.add(str(ipaddress.IPv6Network((rng.getrandbits(48) << 80, 48))))
    return sorted(rules)


def _best(function, loops: int) -> float:
    return min(timeit.repeat(function, number=loops, repeat=5)) / loops * 1e6


def _median_per_connection(connect, rounds: int = 21, per_round: int = 2000) -> float:
    """Median CPU µs of one ``connect()`` over ``rounds`` rounds of ``per_round`` calls."""
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(per_round):
            connect()
        samples.append((time.process_time() - started) / per_round * 1e6)
    return statistics.median(samples)


def pipeline_costs() -> None:
    peer, local = ("127.0.0.1", 40000), ("127.0.0.1", 25)
    header = proxy_protocol.encode_v2(("192.0.2.77", 51000), ("198.51.100.1", 25))
    first_read = header + b"x" * 64
    hello_path = Path(__file__).resolve().parent.parent / "tests/data/client_hello"
    hello = bytes.fromhex((hello_path / "openssl_tls13_sni.hex").read_text().replace("\n", ""))
    routes = ServerNameTable([["b.test"], ["a.test"]])
    limits = ConnectionLimits()
    allow = ["192.0.2.0/24", "2001:db8::/32"]
    cases = [
        ("no pipeline (None)", None, b""),
        ("accept_proxy v2", compile_pipeline(accept_proxy="v2"), first_read),
        ("allow", compile_pipeline(allow=allow), b""),
        ("per-source limit", compile_pipeline(limits=limits, scope=0,
                                              max_connections_per_source=50), b""),
        ("accept_proxy v2 + allow + per-source limit",
         compile_pipeline(accept_proxy="v2", allow=allow, limits=limits, scope=1,
                          max_connections_per_source=50), first_read),
        ("SNI (240-byte hello)", compile_pipeline(routes=routes), hello),
        ("all four (v2 + allow + limit + SNI)",
         compile_pipeline(accept_proxy="v2", allow=allow, limits=limits, scope=2,
                          max_connections_per_source=50, routes=routes), header + hello),
    ]
    results = {}
    for label, pipeline, data in cases:
        if pipeline is None:
            def connect(pipeline=pipeline) -> None:
                if pipeline is not None:
                    raise AssertionError
        elif data:
            def connect(pipeline=pipeline, data=data) -> None:
                adm = pipeline.open(peer, local)
                adm.start()
                verdict = adm.feed(data)
                assert verdict.__class__.__name__ == "Accept", verdict
                adm.release()
        else:
            def connect(pipeline=pipeline) -> None:
                adm = pipeline.open(peer, local)
                adm.start()
                adm.release()
        results[label] = _median_per_connection(connect)
    for label, cost in results.items():
        print(f"pipeline per connection, {label:44s}: {cost:7.2f} µs CPU (median)")


def main() -> None:
    if "--pipeline-only" in sys.argv[1:]:
        pipeline_costs()
        return
    pipeline_costs()
    rng = random.Random(1)
    clients = {"ipv4": "192.0.2.77", "ipv6": "2001:db8::77", "mapped": "::ffff:192.0.2.77"}
    for count in (1, 10_000):
        acl = compile_acl(_rules(count, rng), ["203.0.113.0/24"])
        for label, ip in clients.items():
            print(f"acl check, {count:6d} allow rules, {label:6s}: "
                  f"{_best(lambda acl=acl, ip=ip: acl.check(ip), 20000):.2f} µs")
    lock = ProcessLock()

    def lock_only() -> None:
        with lock:
            pass

    print(f"shared.ProcessLock with-block (fcntl pair):    {_best(lock_only, 20000):.2f} µs")
    record = RecordLock()

    def record_only() -> None:
        record.acquire()
        record.release()

    print(f"limits.RecordLock acquire+release:             {_best(record_only, 20000):.2f} µs")
    limits = ConnectionLimits()
    cases = {
        "max_connections only":          dict(max_connections=5000),
        "all three limits, ipv4":        dict(max_connections=5000, max_per_source=50,
                                              max_new_per_second=10**9),
    }
    for label, kwargs in cases.items():
        def cycle(kwargs: dict = kwargs) -> None:
            limits.release(limits.acquire(0, "192.0.2.77", **kwargs))
        print(f"limits acquire+release, {label:22s}: {_best(cycle, 20000):.2f} µs")

    def cycle6() -> None:
        limits.release(limits.acquire(0, "2001:db8::77", 5000, 50, 10**9))
    print(f"limits acquire+release, all three, ipv6     : {_best(cycle6, 20000):.2f} µs")
    # With 5,000 other sources in the table (probes over a realistic fill).
    held = [limits.acquire(1, f"10.{i >> 8}.{i & 255}.1", 0, 50) for i in range(5000)]
    assert all(t >= 0 for t in held)

    def cycle_full() -> None:
        limits.release(limits.acquire(1, "192.0.2.77", 10**6, 50, 10**9))
    print(f"limits acquire+release, all three, 5k sources: {_best(cycle_full, 20000):.2f} µs")

    # Contended: 2 processes cycling at once on one lock (the machine's 2 cores).
    cycles = 20000
    started = time.perf_counter()
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(cycles):
                    limits.release(limits.acquire(2, "192.0.2.77", 10**6, 50, 10**9))
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    elapsed = time.perf_counter() - started
    print(f"2 processes contending, all three limits:     {elapsed / cycles * 1e6:.2f} µs "
          f"per acquire+release each ({2 * cycles / elapsed:,.0f} connections/s in all)")


if __name__ == "__main__":
    main()
