"""send_proxy against a real reader: nginx stream ``listen ... proxy_protocol``.

prefork-proxy (``send_proxy = "v1"`` / ``"v2"``) in front of an nginx stream
server that answers every connection with ``$proxy_protocol_addr:$proxy_protocol_port``:
the answer must be the real client's address and port (its own
``getsockname()``), so nginx parsed our header as the client's.

nginx runs as the test user in a temp dir (``-p``, ``-e``, ``daemon off``,
``master_process off``, pid and logs there), with the stream module loaded
from /usr/lib/nginx/modules.  Skipped, with the reason, when nginx or its
stream module is absent (scripts/install-peers installs both).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from support import accepts, free_port, recv_until_eof, wait_for, write_config

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                  else None)
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed "
                       "(apt-get install nginx; scripts/install-peers installs it)"),
    pytest.mark.skipif(not STREAM_MODULE.exists(), reason=f"nginx's stream module is absent "
                       f"({STREAM_MODULE}; apt-get install libnginx-mod-stream)"),
]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory) -> Iterator[int]:
    """An nginx stream server on a free loopback port; yields the port."""
    root = tmp_path_factory.mktemp("nginx")
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        f"load_module {STREAM_MODULE};\n"
        "daemon off;\nmaster_process off;\n"
        f"pid {root / 'nginx.pid'};\nerror_log {root / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        "stream {\n"
        f"  server {{ listen 127.0.0.1:{port} proxy_protocol;\n"
        "           return \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }\n"
        "}\n")
    process = subprocess.Popen([NGINX, "-p", str(root), "-e", str(root / "error.log"),
                                "-c", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: accepts(port) or process.poll() is not None, timeout=10,
                 message="nginx listening")
        if process.poll() is not None:
            pytest.fail(f"nginx exited {process.returncode}: "
                        f"{process.stderr.read().decode(errors='replace')}")  # type: ignore
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_reports_the_real_client_from_our_header(nginx: int, proxy_factory,
                                                      tmp_path: Path, version: str):
    config = write_config(tmp_path / "p.toml", (
        "[server]\nworkers = 1\n\n[[tcp_proxy]]\nbind = \"127.0.0.1:0\"\n"
        f"backends = [\"127.0.0.1:{nginx}\"]\nsend_proxy = \"{version}\"\n"))
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    for _ in range(3):  # a fresh client port each time
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as client:
            host, port = client.getsockname()[:2]
            client.settimeout(10)
            assert recv_until_eof(client) == f"{host}:{port}\n".encode()
