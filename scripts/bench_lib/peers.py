"""The proxies under test ("peers") and how to start each one in front of a backend.

Every peer gets one instance per backend (iperf3, redis, echo/hold), each on
its own loopback port, because an L4 proxy forwards a listener to exactly one
backend. Separate instances also keep the measurements apart: CPU is read from
the iperf3 instance's process tree, memory from the hold instance's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .install import NGINX_STREAM_MODULE, nginx_has_static_stream
from .procs import Managed, Registry

PEER_ORDER = ["direct", "haproxy", "nginx", "socat", "prefork"]
REPO_ROOT = Path(__file__).resolve().parents[2]

# Peers relay thousands of idle connections: two fds each (client + backend).
MAXCONN = 8000


@dataclass
class Endpoint:
    """Where a client connects to reach ``backend`` through ``peer``."""

    peer: str
    backend: str
    port: int
    proc: Managed | None  # None for `direct`: nothing sits in between


@dataclass
class PeerOptions:
    prefork_cmd: list[str] | None  # explicit command prefix (--prefork-cmd), else auto
    prefork_relay: str | None      # appended as `--relay X` when set
    socat_backlog: int = 1024      # 0: socat's own default listen backlog (5)


def peer_unavailable_reason(peer: str, opts: PeerOptions) -> str | None:
    """Why ``peer`` cannot run here, or None if it can."""
    binary = {"haproxy": "haproxy", "nginx": "nginx", "socat": "socat"}.get(peer)
    if binary and shutil.which(binary) is None:
        return f"`{binary}` not installed"
    if peer == "nginx" and not (NGINX_STREAM_MODULE.exists() or nginx_has_static_stream()):
        return "nginx stream module missing (libnginx-mod-stream)"
    if peer == "prefork":
        return prefork_unavailable_reason(opts)
    return None


def prefork_command(opts: PeerOptions) -> list[str]:
    if opts.prefork_cmd:
        return list(opts.prefork_cmd)
    # The one installed next to the Python running the bench: the repo's .venv
    # (editable, this checkout's code) once scripts/bench has re-run there.
    beside = Path(sys.executable).parent / "prefork-proxy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    exe = shutil.which("prefork-proxy")
    return [exe] if exe else [sys.executable, "-m", "prefork_proxy"]


def prefork_env(opts: PeerOptions | None = None) -> dict[str, str]:
    # The `python3 -m prefork_proxy` fallback must find the package in the
    # repo even when it is not pip-installed.  An explicit --prefork-cmd runs
    # as it is: the repo on its path would shadow the install it names (an
    # older commit's venv would run this checkout's code).
    env = dict(os.environ)
    if opts is not None and opts.prefork_cmd:
        return env
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def prefork_unavailable_reason(opts: PeerOptions) -> str | None:
    argv = prefork_command(opts) + ["start", "--help"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             env=prefork_env(opts), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{' '.join(argv)}` failed: {exc}"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return f"`{' '.join(argv)}` exited {out.returncode}: {last[0]}"
    if opts.prefork_relay and "--relay" not in out.stdout + out.stderr:
        return f"`start --help` does not mention --relay (wanted --relay {opts.prefork_relay})"
    return None


def start_peer(reg: Registry, peer: str, backend: str, backend_port: int,
               opts: PeerOptions) -> Endpoint:
    """Start ``peer`` in front of ``backend_port``; readiness is checked by the caller."""
    if peer == "direct":
        return Endpoint(peer, backend, backend_port, None)
    port = reg.free_port()
    name = f"{peer}-{backend}"
    rundir = reg.workdir / name
    rundir.mkdir(parents=True, exist_ok=True)
    if peer == "haproxy":
        proc = reg.start(name, haproxy_argv(rundir, port, backend_port))
    elif peer == "nginx":
        proc = reg.start(name, nginx_argv(rundir, port, backend_port))
    elif peer == "socat":
        proc = reg.start(name, socat_argv(port, backend_port, opts.socat_backlog))
    elif peer == "prefork":
        proc = reg.start(name, prefork_argv(opts, port, backend_port),
                         env=prefork_env(opts), cwd=rundir)
    else:
        raise ValueError(f"unknown peer {peer}")
    return Endpoint(peer, backend, port, proc)


def haproxy_argv(rundir: Path, port: int, backend_port: int) -> list[str]:
    cfg = rundir / "haproxy.cfg"
    cfg.write_text(f"""\
global
    nbthread 2
    maxconn {MAXCONN}

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server s1 127.0.0.1:{backend_port}
""")
    # -db: stay in the foreground, no master-worker: one process, 2 threads.
    return ["haproxy", "-db", "-f", str(cfg)]


def nginx_argv(rundir: Path, port: int, backend_port: int) -> list[str]:
    load = "" if nginx_has_static_stream() else f"load_module {NGINX_STREAM_MODULE};\n"
    cfg = rundir / "nginx.conf"
    cfg.write_text(f"""\
{load}daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid {rundir}/nginx.pid;
error_log {rundir}/error.log warn;

events {{
    worker_connections {MAXCONN + 4000};
}}

stream {{
    server {{
        listen 127.0.0.1:{port};
        proxy_pass 127.0.0.1:{backend_port};
    }}
}}
""")
    # -p: own prefix; -e: the startup error log too, before the config is read.
    return ["nginx", "-p", str(rundir), "-c", str(cfg), "-e", str(rundir / "error.log")]


def socat_argv(port: int, backend_port: int, backlog: int) -> list[str]:
    # bind=127.0.0.1 keeps the listener on loopback (socat binds 0.0.0.0 otherwise).
    # socat's default listen backlog is 5: with 50 clients reconnecting, SYNs
    # overflow it and wait out 1 s/3 s retransmits, which measures that queue
    # rather than socat's fork-per-connection design. Hence a larger backlog.
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
    if backlog:
        listen += f",backlog={backlog}"
    return ["socat", listen, f"TCP:127.0.0.1:{backend_port}"]


def prefork_argv(opts: PeerOptions, port: int | str, backend_port: int | str) -> list[str]:
    argv = prefork_command(opts) + ["start", "--bind", f"127.0.0.1:{port}",
                                    "--backend", f"127.0.0.1:{backend_port}", "--workers", "2"]
    if opts.prefork_relay:
        argv += ["--relay", opts.prefork_relay]
    return argv
