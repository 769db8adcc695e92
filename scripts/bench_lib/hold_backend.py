#!/usr/bin/env python3
"""Echo/hold backend for the idle-connection test.

A single-threaded ``selectors`` server: it accepts every connection, echoes
whatever it receives (so the benchmark can check each connection with one
small round trip) and otherwise just holds the connection open until the peer
closes it. It is deliberately minimal so that its own memory does not matter:
the benchmark measures the *proxy's* memory, not this process's.

Usage: hold_backend.py --port PORT [--host 127.0.0.1]
"""
from __future__ import annotations

import argparse
import resource
import selectors
import signal
import socket
import sys


def raise_fd_limit() -> None:
    """Hold thousands of sockets: lift the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(host: str, port: int) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, data=None)

    while True:
        for key, _ in sel.select():
            if key.data is None:
                accept_all(sel, listener)
            else:
                echo_once(sel, key.fileobj)  # type: ignore[arg-type]


def accept_all(sel: selectors.BaseSelector, listener: socket.socket) -> None:
    # Drain the accept queue in one go: connections arrive in bursts.
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # e.g. EMFILE: leave it queued, try again on next wakeup
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, data=True)


def echo_once(sel: selectors.BaseSelector, conn: socket.socket) -> None:
    try:
        data = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        sel.unregister(conn)
        conn.close()
        return
    try:
        # Payloads are tiny (probe bytes); a short write is not a concern here.
        conn.send(data)
    except OSError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
