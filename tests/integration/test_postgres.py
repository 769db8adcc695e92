"""A real PostgreSQL behind the proxy, over unix sockets both ways, queried with ``psql``.

The test starts its own server (``initdb`` + ``postgres``, found under
/usr/lib/postgresql/*/bin; scripts/install-peers installs them) in a temporary
directory, listening on a unix socket there and on 127.0.0.1:free_port.
PostgreSQL refuses to run as root, so when the test runs as root the server
runs as an unprivileged user (``postgres`` if it exists, else ``nobody``;
``subprocess``'s ``user=``/``group=``, what ``setpriv`` does).  Then ``psql``
runs a query through a TCP listener to the unix-socket backend, and through a
unix-socket listener to the TCP backend.  Skipped, with the reason, when the
binaries are absent or no unprivileged user can run them.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from support import free_port, wait_for, write_config


def _bin_dir() -> Optional[Path]:
    """The newest PostgreSQL's bin directory that has initdb, postgres and psql."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if all(os.access(Path(d) / name, os.X_OK) for name in ("initdb", "postgres",
                                                                      "psql"))]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
               default=None)


def _server_user() -> Optional[pwd.struct_passwd]:
    """Who runs the server: this user, or as root an unprivileged one (None: nobody fits)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


class Postgres:
    """One server: data and socket directory in ``root``, also on 127.0.0.1:``port``."""

    def __init__(self, bin_dir: Path, user: pwd.struct_passwd, root: Path) -> None:
        self.bin_dir, self.user, self.root = bin_dir, user, root
        self.data, self.sockets = root / "data", root / "sockets"
        self.port = free_port()
        self.socket_path = self.sockets / f".s.PGSQL.{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def _as_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def start(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        env = dict(os.environ, LC_ALL="C", LANG="C")
        result = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(self.data), "-A",
                                 "trust", "-U", "tester", "--no-sync", "-E", "UTF8"],
                                capture_output=True, text=True, timeout=120, env=env,
                                cwd=self.root, **self._as_user())
        if result.returncode != 0:
            pytest.skip(f"initdb failed as {self.user.pw_name}: {result.stderr[-400:]}")
        self.log = open(self.root / "postgres.log", "wb")
        self.process = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(self.data), "-k", str(self.sockets),
             "-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "max_connections=20", "-c", "shared_buffers=16MB"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
            **self._as_user())
        wait_for(lambda: self._ready(), 60, interval=0.1, message="postgres accepting")

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError("postgres exited:\n"
                                 + (self.root / "postgres.log").read_text(errors="replace"))
        return self.socket_path.exists() and psql(self.bin_dir, ["-h", str(self.sockets), "-p",
                                                                 str(self.port)],
                                                  "SELECT 1", check=False) == "1"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if hasattr(self, "log"):
            self.log.close()


def psql(bin_dir: Path, where: List[str], query: str, check: bool = True) -> str:
    """``psql`` ``query`` at ``where`` (-h/-p), its unaligned output ("" on failure
    unless ``check``)."""
    result = subprocess.run([str(bin_dir / "psql"), *where, "-U", "tester", "-d", "postgres",
                             "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", query],
                            capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, PGCONNECT_TIMEOUT="10"))
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin; "
                    "scripts/install-peers installs it)")
    user = _server_user()
    if user is None:
        pytest.skip("running as root and no unprivileged user (postgres, nobody) to run "
                    "the server as: PostgreSQL refuses root")
    # Not under pytest's tmp_path: as root that is 0700, where the server's user cannot go.
    root = Path(tempfile.mkdtemp(prefix="unixv6-pg-"))
    os.chmod(root, 0o755)
    server = Postgres(bin_dir, user, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(180)
def test_psql_through_tcp_to_a_unix_backend_and_through_unix_to_a_tcp_backend(
        postgres, proxy_factory, tmp_path):
    front = tmp_path / "front"
    front.mkdir()
    # psql finds a server's socket as DIR/.s.PGSQL.PORT: the proxy's unix listener is one.
    unix_listener = front / ".s.PGSQL.6432"
    config = write_config(tmp_path / "proxy.toml", f"""
[server]
workers = 2

[[tcp_proxy]]
name = "tcp-to-unix"
bind = "127.0.0.1:0"
backends = ["unix:{postgres.socket_path}"]

[[tcp_proxy]]
name = "unix-to-tcp"
bind = "unix:{unix_listener}"
backends = ["127.0.0.1:{postgres.port}"]
""")
    proxy = proxy_factory("start", "--config", str(config))
    tcp = ["-h", "127.0.0.1", "-p", str(proxy.port(0))]
    unix = ["-h", str(front), "-p", "6432"]
    assert psql(postgres.bin_dir, tcp, "SELECT 1") == "1"
    # Which way the server saw each client: unix socket (no address) or TCP from 127.0.0.1.
    assert psql(postgres.bin_dir, tcp, "SELECT coalesce(inet_client_addr()::text, 'unix')") \
        == "unix"
    assert psql(postgres.bin_dir, unix, "SELECT host(inet_client_addr())") == "127.0.0.1"
    psql(postgres.bin_dir, unix, "CREATE TABLE t (n int); INSERT INTO t "
                                 "SELECT generate_series(1, 1000)")
    assert psql(postgres.bin_dir, unix, "SELECT count(*), sum(n) FROM t") == "1000|500500"
    # A result of several MB back through both listeners, checked by the server's hash.
    big = ("SELECT md5(string_agg(repeat(n::text, 500), ',' ORDER BY n)) FROM t")
    assert psql(postgres.bin_dir, tcp, big) == psql(postgres.bin_dir, unix, big)
    rows = psql(postgres.bin_dir, tcp, "SELECT repeat('x', 1000) FROM t").splitlines()
    assert rows == ["x" * 1000] * 1000
