"""Per-connection cost of the admission parts: ACL lookups and limits acquire+release.

    .venv/bin/python scripts/bench_admission.py

Single process, no contention: the cost a relay thread pays per accepted
connection (the best of 5 repeats, in µs).  Under contention the record lock
also serializes workers for the time it is held.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time
import timeit

from prefork_proxy.acl import compile_acl
from prefork_proxy.limits import ConnectionLimits, RecordLock
from prefork_proxy.shared import ProcessLock


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


def main() -> None:
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
