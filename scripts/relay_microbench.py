#!/usr/bin/env python3
"""Microbenchmark of the relay's request/response fast path: ``Direction.pump``.

One ``Direction`` between two socketpairs, in this process, no epoll: a small
message is put into the source, then ``pump()`` is timed alone (it reads the
burst and writes it out); the destination is emptied outside the timing.  So
the figure is what the relay thread spends per request of kept-alive
request/response traffic, system calls included, and nothing else::

    .venv/bin/python scripts/relay_microbench.py              # 64 B and 1 KiB, 200,000 each
    .venv/bin/python scripts/relay_microbench.py --budget-spent

``--budget-spent`` runs the same with the loop's buffer budget spent (a
healthy direction must then cost the same: it holds nothing).  Prints the
median and the mean in nanoseconds per ``pump``, best of ``--repeats`` runs.
Bounded: ``--count`` messages per run (at most 2,000,000).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefork_proxy.relay import BufferPool, Direction  # noqa: E402


def run(size: int, count: int, budget_spent: bool) -> tuple:
    src_peer, src = socket.socketpair()
    dst, dst_peer = socket.socketpair()
    for sock in (src, dst, dst_peer):
        sock.setblocking(False)
    buffers = BufferPool()
    if budget_spent:
        buffers.left = 0
    direction = Direction(src, dst, buffers)
    message = b"x" * size
    samples = []
    clock = time.perf_counter_ns
    try:
        for _ in range(count):
            src_peer.send(message)
            started = clock()
            state = direction.pump()
            samples.append(clock() - started)
            assert state == "read", state
            got = dst_peer.recv(65536)
            assert len(got) == size, len(got)
    finally:
        for sock in (src_peer, src, dst, dst_peer):
            sock.close()
    return statistics.median(samples), statistics.fmean(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="64,1024")
    parser.add_argument("--budget-spent", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.count <= 2_000_000 or not 1 <= args.repeats <= 20:
        parser.error("--count 1..2,000,000, --repeats 1..20")
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [run(size, args.count, args.budget_spent) for _ in range(args.repeats)]
        median = min(r[0] for r in runs)
        mean = min(r[1] for r in runs)
        print(f"pump {size:5d} B{' (budget spent)' if args.budget_spent else ''}: "
              f"median {median:.0f} ns, mean {mean:.0f} ns (best of {args.repeats} x "
              f"{args.count})")


if __name__ == "__main__":
    main()
