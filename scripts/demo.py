"""The demo behind ``scripts/demo``: two backends, prefork-proxy in front, visible traffic.

Runs everything on 127.0.0.1 for about ten seconds, then stops the proxy with
SIGTERM (a graceful stop) and exits.  The proxy's own log lines are shown as
they come, prefixed with ``proxy |``.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import threading
import time


def run_backend(name: str) -> int:
    """A tiny line server: answers each line with its own name and the line, upper-cased."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                stream.write(f"{name} says: ".encode() + line.upper())
                stream.flush()

    def accept_forever() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    return server.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    backends = [f"127.0.0.1:{run_backend(name)}" for name in ("backend-A", "backend-B")]
    command = [sys.executable, "-m", "prefork_proxy", "start", "--bind", "127.0.0.1:0",
               "--workers", str(args.workers)]
    for backend in backends:
        command += ["--backend", backend]
    print("demo: backends listening on", ", ".join(backends))
    print("demo: starting", " ".join(["prefork-proxy", *command[3:]]))
    proxy = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert proxy.stderr is not None
    ready = threading.Event()
    port: list = []

    def show_logs() -> None:
        for line in proxy.stderr:
            print("proxy |", line.rstrip())
            match = re.search(r"ready pid=\d+ listeners=\S+:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                ready.set()

    threading.Thread(target=show_logs, daemon=True).start()
    if not ready.wait(15):
        print("demo: the proxy did not become ready", file=sys.stderr)
        proxy.kill()
        return 1
    print(f"demo: proxy ready on 127.0.0.1:{port[0]}; sending traffic through it\n")
    try:
        for number in range(1, args.connections + 1):
            with socket.create_connection(("127.0.0.1", port[0]), timeout=5) as conn, \
                    conn.makefile("rwb") as stream:
                message = f"hello number {number} through prefork-proxy\n"
                stream.write(message.encode())
                stream.flush()
                answer = stream.readline().decode().rstrip()
                print(f"client | sent {message.strip()!r:48} got {answer!r}")
            time.sleep(0.5)
    finally:
        print("\ndemo: stopping the proxy with SIGTERM (graceful drain)")
        proxy.terminate()
        code = proxy.wait(40)
        time.sleep(0.1)  # let the log thread print the last lines
    print(f"demo: proxy exited with code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
