#!/usr/bin/env python3
"""Capture real TLS ClientHellos into tests/data/client_hello/ (fixtures of test_client_hello).

Run by hand, never by the tests: ``python3 scripts/capture_client_hello.py``.
It listens on 127.0.0.1 (an ephemeral port), runs each client against it
(``openssl s_client``, Python's ``ssl``, ``curl`` when installed), keeps the
first bytes each client sends until its first handshake message is complete,
closes, and writes ``<name>.hex`` plus ``manifest.json`` (who sent it, which
version, which command).  Then it derives re-framed fixtures from a captured
one (the same hello split across two TLS records).

The framing here is read by its own few lines (record headers and the 3-byte
handshake length), not by prefork_proxy.client_hello, so a bug in the reader
cannot shape the fixtures it is tested on.  Each run gives new bytes (random,
key shares): the tests assert only what a client was asked to send.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "client_hello"
TIMEOUT_S = 10.0


def read_first_handshake_message(conn: socket.socket) -> bytes:
    """The raw bytes (records and all) up to the end of the first handshake message."""
    raw = b""
    payload = b""

    def need(n: int) -> None:
        nonlocal raw
        while len(raw) < n:
            chunk = conn.recv(65536)
            if not chunk:
                raise EOFError(f"client closed after {len(raw)} bytes")
            raw += chunk

    offset = 0
    while True:
        need(offset + 5)
        (length,) = struct.unpack_from(">H", raw, offset + 3)
        need(offset + 5 + length)
        payload += raw[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(payload) >= 4 and len(payload) >= 4 + int.from_bytes(payload[1:4], "big"):
            return raw[:offset]


def capture(run_client: Callable[[int], None]) -> bytes:
    """Start a one-shot loopback server, run the client against it, return its hello."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(TIMEOUT_S)
        port = listener.getsockname()[1]
        errors: List[BaseException] = []

        def client() -> None:
            try:
                run_client(port)
            except BaseException as exc:  # reported below, after the accept
                errors.append(exc)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise RuntimeError(f"client never connected: {errors}") from None
        with conn:
            conn.settimeout(TIMEOUT_S)
            data = read_first_handshake_message(conn)
        thread.join(TIMEOUT_S)
        return data


def run_command(args: List[str]) -> Callable[[int], None]:
    def run(port: int) -> None:
        argv = [a.replace("{port}", str(port)) for a in args]
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=TIMEOUT_S,
            check=False,  # the server hangs up mid-handshake: every client fails
        )

    return run


def run_python(
    server_hostname: Optional[str], alpn: Optional[List[str]], max_tls12: bool = False
) -> Callable[[int], None]:
    def run(port: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if max_tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
            try:
                with ctx.wrap_socket(sock, server_hostname=server_hostname):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the server closes after the hello

    return run


def tool_version(argv: List[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    except OSError:
        return ""
    return out.splitlines()[0].strip() if out else ""


def openssl_offers(group: str) -> bool:
    """Whether this openssl s_client accepts ``-groups group`` (it fails before connecting)."""
    result = subprocess.run(
        ["openssl", "s_client", "-groups", group, "-connect", "127.0.0.1:9", "-tls1_3"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return "cannot be set" not in result.stderr and "SSL_CONF_cmd" not in result.stderr


def reframe(hello: bytes, cut: int) -> bytes:
    """The same handshake bytes in two records: the first ``cut`` bytes, then the rest."""
    (length,) = struct.unpack_from(">H", hello, 3)
    assert len(hello) == 5 + length, "reframe expects a one-record hello"
    head, message = hello[:3], hello[5:]
    first, second = message[:cut], message[cut:]
    return b"".join(
        (head, struct.pack(">H", len(first)), first, head, struct.pack(">H", len(second)), second)
    )


def write_hex(path: Path, data: bytes) -> None:
    text = data.hex()
    path.write_text("\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + "\n")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    openssl = tool_version(["openssl", "version"])
    python = f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}"
    curl = tool_version(["curl", "--version"]) if shutil.which("curl") else ""
    s_client = ["openssl", "s_client", "-connect", "127.0.0.1:{port}"]
    clients: Dict[str, tuple] = {
        "openssl_tls13_sni": (openssl, s_client + ["-tls1_3", "-servername", "a.test"]),
        "openssl_tls12_sni": (openssl, s_client + ["-tls1_2", "-servername", "a.test"]),
        "openssl_tls13_nosni": (openssl, s_client + ["-tls1_3", "-noservername"]),
        "openssl_tls12_nosni": (openssl, s_client + ["-tls1_2", "-noservername"]),
        "openssl_tls13_alpn": (
            openssl,
            s_client + ["-servername", "api.example.com", "-alpn", "h2,http/1.1"],
        ),
        "openssl_tls12_alpn": (
            openssl,
            s_client + ["-tls1_2", "-servername", "db.internal", "-alpn", "postgresql"],
        ),
        "openssl_tls13_upper_trailing_dot": (
            openssl,
            s_client + ["-tls1_3", "-servername", "WWW.Example.COM."],
        ),
        # A multi-KB hello from a real client: a 1,024-byte ffdhe8192 key share.
        "openssl_tls13_ffdhe8192": (
            openssl,
            s_client + ["-tls1_3", "-servername", "big.test", "-groups", "ffdhe8192"],
        ),
        "python_tls13_sni_alpn": (python, run_python("b.test", ["h2", "http/1.1"])),
        "python_tls12_sni": (python, run_python("b.test", None, max_tls12=True)),
        "python_nosni": (python, run_python(None, None)),
    }
    skipped: Dict[str, str] = {}
    if openssl_offers("X25519MLKEM768"):
        clients["openssl_tls13_x25519mlkem768"] = (
            openssl,
            s_client + ["-tls1_3", "-servername", "pq.test", "-groups", "X25519MLKEM768"],
        )
    else:
        skipped["openssl_tls13_x25519mlkem768"] = f"{openssl} does not offer X25519MLKEM768"
    if curl:
        resolve = ["--resolve", "c.test:{port}:127.0.0.1", "https://c.test:{port}/"]
        clients["curl_default"] = (curl, ["curl", "-sk", "--max-time", "5"] + resolve)
        clients["curl_tls12_http11"] = (
            curl,
            ["curl", "-sk", "--max-time", "5", "--tlsv1.2", "--tls-max", "1.2", "--http1.1"]
            + resolve,
        )
    else:
        skipped["curl_default"] = "curl is not installed"

    manifest: Dict[str, dict] = {}
    for name, (version, how) in clients.items():
        run = run_command(how) if isinstance(how, list) else how
        data = capture(run)
        write_hex(OUT / f"{name}.hex", data)
        manifest[name] = {
            "client": version,
            "command": " ".join(how) if isinstance(how, list) else "python ssl (see script)",
            "bytes": len(data),
        }
        print(f"{name}: {len(data)} bytes")

    # Derived: the TLS 1.3 hello re-framed into two records, cut inside the
    # server_name extension's neighbourhood (byte 100 of the handshake message).
    base = (OUT / "openssl_tls13_sni.hex").read_text()
    two = reframe(bytes.fromhex(base.replace("\n", "")), 100)
    write_hex(OUT / "derived_two_records.hex", two)
    manifest["derived_two_records"] = {
        "client": "derived from openssl_tls13_sni",
        "command": "reframe(hello, 100): handshake bytes [0,100) and [100,end) in two records",
        "bytes": len(two),
    }
    manifest["_skipped"] = skipped
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
