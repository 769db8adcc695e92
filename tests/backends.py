"""Test backends: small real TCP servers run as separate processes on loopback.

Started by ``support.start_backend`` as ``python tests/backends.py MODE --name N``;
each prints ``listening PORT`` on stdout once it accepts, then serves until
killed.  They run in their own process so the test's clients and the backend
do not share a GIL.

Modes (every reply is transformed, so a passing test proves the bytes really
crossed the backend, as nginx's stream tests do):

- ``echo``: send back every byte XOR 0x5A, as it arrives; echo EOF as EOF.
- ``tag``: first send ``NAME\\n``, then behave like ``echo``.
- ``reply-after-eof``: read until EOF, then send ``sha256(received)`` in hex,
  ``\\n``, and ``--reply-bytes`` bytes: the first 64 KiB received, repeated and
  transformed; then close.
- ``reset``: echo, but after ``--reset-after`` bytes received, close with RST.
- ``pong``: a Redis-like health-check target: answer ``+PONG\\r\\n`` to each
  ``PING\\r\\n`` line (``-ERR\\r\\n`` to any other line), untransformed.
- ``whois``: a backend that requires nothing but reports what it was told:
  if the stream starts with a PROXY header (v1 or v2; parsed here by its own
  few lines, independent of ``prefork_proxy.proxy_protocol``), it answers
  ``FROM ip port\\n`` (``LOCAL\\n`` for v2 LOCAL / v1 UNKNOWN), else
  ``NONE\\n``; then it echoes the rest like ``echo``.  With ``--report`` it
  also prints that line on stdout (a test reading it sees what health checks sent).
"""

from __future__ import annotations

import argparse
import hashlib
import selectors
import socket
import struct
import sys

from support import transform  # run as a script, tests/ is sys.path[0]

#: Echo stops reading from a client while this much waits to be sent (backpressure).
MAX_PENDING = 1 << 20


V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def whois(data: bytes):
    """``(answer line, bytes after the header)``, or None while the header is incomplete."""
    if data.startswith(b"PROXY "):
        if b"\r\n" not in data:
            return None if len(data) < 107 else (b"BAD\n", b"")
        line, _, rest = data.partition(b"\r\n")
        parts = line.split(b" ")
        if parts[1] == b"UNKNOWN":
            return b"LOCAL\n", rest
        return b"FROM " + parts[2] + b" " + parts[4] + b"\n", rest
    if data.startswith(V2_SIGNATURE):
        if len(data) < 16:
            return None
        command, family = data[12] & 0x0F, data[13] >> 4
        end = 16 + struct.unpack("!H", data[14:16])[0]
        if len(data) < end:
            return None
        body, rest = data[16:end], data[end:]
        if command == 0 or family == 0:
            return b"LOCAL\n", rest
        if family == 1:
            ip = socket.inet_ntop(socket.AF_INET, body[:4])
            port = struct.unpack("!H", body[8:10])[0]
        else:
            ip = socket.inet_ntop(socket.AF_INET6, body[:16])
            port = struct.unpack("!H", body[32:34])[0]
        return f"FROM {ip} {port}\n".encode(), rest
    if len(data) < 16 and (b"PROXY "[:len(data)] == data or V2_SIGNATURE[:len(data)] == data):
        return None
    return b"NONE\n", data


class Session:
    """One accepted connection inside the single-threaded backend loop."""

    def __init__(self, server: "Server", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.out = bytearray()
        self.received = 0
        self.hasher = hashlib.sha256()
        self.read_eof = False
        self.after_eof_buffer: list[bytes] = []
        self.line = b""
        self.header: "bytes | None" = b"" if server.mode == "whois" else None
        if server.mode == "tag":
            self.out += f"{server.name}\n".encode()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.read_eof = True
            if self.server.mode == "reply-after-eof":
                digest = self.hasher.hexdigest().encode()
                body = b"".join(self.after_eof_buffer)[:65536] or b"-"
                size = self.server.reply_bytes
                reply = (body * (size // len(body) + 1))[:size]
                self.out += digest + b"\n" + transform(reply)
            self.update()
            return
        self.received += len(data)
        if self.header is not None:
            self.header += data
            told = whois(self.header)
            if told is None:
                return
            answer, data = told
            self.header = None
            if self.server.report:
                print(answer.decode().strip(), flush=True)
            self.out += answer
        if self.server.mode == "pong":
            self.line += data
            while b"\n" in self.line:
                request, _, self.line = self.line.partition(b"\n")
                self.out += b"+PONG\r\n" if request == b"PING\r" else b"-ERR\r\n"
            self.on_writable()
            return
        if self.server.mode == "reply-after-eof":
            self.hasher.update(data)
            if sum(map(len, self.after_eof_buffer)) < 65536:
                self.after_eof_buffer.append(data)
            return
        if self.server.mode == "reset" and self.received >= self.server.reset_after:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close()
            return
        self.out += transform(data)
        self.on_writable()

    def on_writable(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            del self.out[:sent]
        self.update()

    def update(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.read_eof and not self.out:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.close()
            return
        events = 0
        if not self.read_eof and len(self.out) < MAX_PENDING:
            events |= selectors.EVENT_READ
        if self.out:
            events |= selectors.EVENT_WRITE
        self.server.selector.modify(self.sock, events or selectors.EVENT_READ, self)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.server.selector.unregister(self.sock)
            self.sock.close()


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.mode = args.mode
        self.name = args.name
        self.reply_bytes = args.reply_bytes
        self.reset_after = args.reset_after
        self.report = args.report
        self.selector = selectors.DefaultSelector()
        if args.unix:  # a unix socket backend (``--unix PATH``)
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(args.unix)
            self.address = f"unix:{args.unix}"
        else:
            family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
            self.listener = socket.socket(family)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((args.host, args.port))
            port = self.listener.getsockname()[1]
            self.address = f"[{args.host}]:{port}" if family == socket.AF_INET6 \
                else f"{args.host}:{port}"
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)

    def serve(self) -> None:
        port = 0 if self.listener.family == socket.AF_UNIX else self.listener.getsockname()[1]
        print(f"listening {port} {self.address}", flush=True)
        while True:
            for key, events in self.selector.select():
                if key.data is None:
                    self.accept()
                    continue
                session: Session = key.data
                if events & selectors.EVENT_READ:
                    session.on_readable()
                if events & selectors.EVENT_WRITE and session.sock.fileno() >= 0:
                    session.on_writable()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            session = Session(self, sock)
            self.selector.register(sock, selectors.EVENT_READ, session)
            if session.out:
                session.on_writable()


def main() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["echo", "tag", "reply-after-eof", "reset", "pong",
                                           "whois"])
    parser.add_argument("--name", default="backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", default="", help="listen on this unix socket path instead")
    parser.add_argument("--reply-bytes", type=int, default=1 << 20)
    parser.add_argument("--reset-after", type=int, default=1 << 20)
    parser.add_argument("--report", action="store_true", help="whois: print each answer")
    Server(parser.parse_args()).serve()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
