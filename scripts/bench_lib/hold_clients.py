#!/usr/bin/env python3
"""Idle-connection holder for the growth workloads: opens N connections and keeps them.

A process of its own, so that its N client sockets count against its own
open-file limit (20,000 here), not the benchmark's or the proxy's. Each
connection is checked by a one-byte echo round trip before the next is opened
(the target must be an echo backend behind the proxy), so every one really
reaches the backend. Then it prints ``ready N`` on stdout and holds them,
until SIGTERM or ``--max-hold`` seconds, whichever comes first; exiting closes
them all.

Usage: hold_clients.py --port PORT --count N [--timeout 120] [--max-hold 900]
"""
from __future__ import annotations

import argparse
import resource
import signal
import socket
import sys
import time


def open_checked(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.settimeout(5)
        sock.sendall(b"h")
        if sock.recv(1) != b"h":
            raise ConnectionError("no echo from the backend")
    except OSError:
        sock.close()
        raise
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=120.0, help="to open them all (s)")
    parser.add_argument("--max-hold", type=float, default=900.0, help="then exit anyway (s)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    socks = []
    started = time.monotonic()
    try:
        while len(socks) < args.count:
            if time.monotonic() - started > args.timeout:
                print(f"error timed out after {len(socks)} connections", flush=True)
                return 1
            socks.append(open_checked(args.port))
    except OSError as exc:
        print(f"error after {len(socks)} connections: {exc}", flush=True)
        return 1
    print(f"ready {len(socks)} {time.monotonic() - started:.3f}", flush=True)
    deadline = time.monotonic() + args.max_hold
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
