"""Running config variants of one prefork-proxy install side by side (``ab_bench.py variants``).

Who uses it: ``scripts/ab_bench.py variants``, in the foreground, from a shell
(and the smoke test, on small counts). It owns every process it starts (the
backends, one prefork-proxy instance at a time, the HAProxy chain around it
when asked) and stops them all at the end, on Ctrl-C or SIGTERM too.

One round = every variant once, in an order rotated by one from round to
round. One variant's block: a prefork-proxy started from the variant's config
(``bench_lib/variants.py``) in front of redis, ``redis-benchmark -k 1`` then
``-k 0``, with the workers' and the whole tree's CPU read from /proc around
each run; then, with ``idle`` among the workloads, a fresh instance in front
of the hold backend and the idle-memory measurement of ``scripts/bench``
(``workloads.run_idle``). While an instance with ``[admin] bind`` runs, a
thread GETs ``/metrics`` every ``scrape_interval`` seconds.

Options around the proxy, the same for every variant:

* ``chain``: redis-benchmark -> HAProxy ``front`` -> prefork-proxy -> HAProxy
  ``back`` -> the backend (one HAProxy process per instance). ``front`` sends a
  PROXY header (``send-proxy-v2``; ``send-proxy`` for ``accept_proxy = "v1"``)
  only when the variant's listener has ``accept_proxy``; ``back`` accepts one
  only when the variant sends one. Needed because redis cannot read PROXY
  headers and redis-benchmark cannot send them (issue 12).
* ``tls``: the redis backend listens with TLS only (``--tls-port``, a
  self-signed EC certificate for ``sni``) and redis-benchmark connects with
  ``--tls --sni NAME --insecure`` (issue 13: an SNI listener vs a plain one).

Every step is bounded: readiness 20 s, each redis-benchmark 180 s, the idle
opening 120 s, the whole run ``max_minutes``.
"""
from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import growth, procfs, procs, workloads
from .variants import (
    Variant,
    base_document,
    chain_options,
    haproxy_chain_configs,
    merged,
    rotated,
    summary,
    table,
    to_toml,
)

HOLD_BACKEND = Path(__file__).resolve().parent / "hold_backend.py"
WORKLOADS = ("keepalive", "newconn", "idle")


@dataclass
class Options:
    exe: list[str]                       # the prefork-proxy command prefix (one install)
    variants: list[Variant]
    rounds: int = 5
    keepalive_n: int = 100_000
    newconn_n: int = 20_000
    clients: int = 50
    test: str = "ping_mbulk"
    workloads: tuple[str, ...] = ("keepalive", "newconn")
    idle_conns: int = 5000
    chain: bool = False
    tls: bool = False
    sni: str = "bench.test"
    scrape_interval: float = 1.0         # 0: no scraper
    workers: int = 2
    max_minutes: float = 60.0
    out: Path | None = None
    keep_temp: bool = False
    env: dict[str, str] | None = None    # the proxy's environment (None: inherit)
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)


@dataclass
class Instance:
    """One running prefork-proxy of a variant, and what is around it."""

    proxy: procs.Managed
    client_port: int                     # where clients connect (HAProxy front with chain)
    doc: dict[str, Any]                  # the merged config
    workers: set[int]
    chain: list[procs.Managed] = field(default_factory=list)  # HAProxy front, back
    scraper: "Scraper | None" = None


class Scraper(threading.Thread):
    """GET /metrics every ``interval`` seconds until stopped (a Prometheus stand-in)."""

    def __init__(self, host: str, port: int, interval: float) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self.host, self.port, self.interval = host, port, interval
        self.stopping = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.last_bytes = 0

    def scrape_once(self) -> None:
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
            self.last_bytes = len(body)
            self.latencies.append(time.monotonic() - started)
        except (OSError, http.client.HTTPException) as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.scrape_once()

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.join(timeout=5)
        lat = sorted(self.latencies)
        return {"scrapes": len(lat), "failures": len(self.failures),
                "first_failures": self.failures[:3], "bytes": self.last_bytes,
                "median_ms": statistics.median(lat) * 1000 if lat else None,
                "max_ms": lat[-1] * 1000 if lat else None}


# --------------------------------------------------------------------------- backends

def make_cert(workdir: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate for ``name`` (cheap handshakes: the proxy's
    share of a TLS connection's cost is then as large as it gets)."""
    cert, key = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-days", "2"], check=True, capture_output=True, timeout=30)
    return cert, key


def tls_probe(sni: str) -> procs.Probe:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def probe(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname=sni) as sock:
                sock.settimeout(2)
                sock.sendall(b"PING\r\n")
                if not sock.recv(64).startswith(b"+PONG"):
                    raise ConnectionError("redis TLS probe: no +PONG")
    return probe


def start_redis(reg: procs.Registry, tls: bool, sni: str) -> int:
    port = reg.free_port()
    argv = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--dir", str(reg.workdir),
            "--logfile", ""]
    if tls:
        cert, key = make_cert(reg.workdir, sni)
        argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                 "--tls-key-file", str(key), "--tls-auth-clients", "no"]
    else:
        argv += ["--port", str(port)]
    proc = reg.start("redis", argv)
    procs.wait_ready(proc, port, tls_probe(sni) if tls else procs.probe_redis)
    return port


def start_hold(reg: procs.Registry) -> int:
    port = reg.free_port()
    proc = reg.start("hold", [sys.executable, str(HOLD_BACKEND), "--port", str(port)])
    procs.wait_ready(proc, port, procs.probe_echo)
    return port


# --------------------------------------------------------------------------- instances

def start_instance(reg: procs.Registry, opts: Options, variant: Variant, backend_port: int,
                   probe: procs.Probe, label: str) -> Instance:
    """prefork-proxy from the variant's config in front of ``backend_port`` (through the
    HAProxy chain with ``opts.chain``), ready on its client port, both workers booted."""
    rundir = reg.workdir / label
    rundir.mkdir(parents=True, exist_ok=True)
    prefork_port = reg.free_port()
    front_port = back_port = None
    if opts.chain:
        front_port, back_port = reg.free_port(), reg.free_port()
    target = back_port or backend_port
    tokens = {"PORT": str(reg.free_port()), "BACKEND": f"127.0.0.1:{target}",
              "RUNDIR": str(rundir)}
    doc = merged(base_document(prefork_port, target, opts.workers), variant, tokens)
    config = rundir / "prefork.toml"
    config.write_text(to_toml(doc))
    chain: list[procs.Managed] = []
    if opts.chain:
        send, accept = chain_options(doc["tcp_proxy"][0])
        texts = haproxy_chain_configs(front_port, prefork_port, back_port, backend_port,
                                      send, accept)
        for part, text in zip(("front", "back"), texts):
            cfg = rundir / f"haproxy-{part}.cfg"
            cfg.write_text(text)
            chain.append(reg.start(f"{label}-haproxy-{part}", ["haproxy", "-db", "-f", str(cfg)]))
    proxy = reg.start(f"{label}-prefork", [*opts.exe, "start", "--config", str(config)],
                      env=opts.env, cwd=rundir)
    inst = Instance(proxy, front_port or prefork_port, doc, set(), chain)
    try:
        try:
            procs.wait_ready(proxy, inst.client_port, probe, timeout=20)
        except procs.StartError as exc:
            dead = [f"{h.name} exited: {h.stderr_tail(3)}" for h in chain if not h.alive()]
            raise procs.StartError("\n".join([str(exc), *dead])) from None
        deadline = time.monotonic() + 20
        while len(growth.booted_pids(proxy.stderr_path, 0)) < opts.workers \
                and time.monotonic() < deadline and proxy.alive():
            time.sleep(0.05)
        inst.workers = growth.booted_pids(proxy.stderr_path, 0)
        if len(inst.workers) < opts.workers:
            raise procs.StartError(f"{label}: {len(inst.workers)} of {opts.workers} workers "
                                   f"booted within 20 s:\n{proxy.stderr_tail()}")
    except BaseException:
        stop_instance(reg, inst)
        raise
    bind = doc.get("admin", {}).get("bind")
    if bind and opts.scrape_interval > 0:
        host, _, port = bind.rpartition(":")
        inst.scraper = Scraper(host.strip("[]"), int(port), opts.scrape_interval)
        inst.scraper.scrape_once()  # the exposition's one-off setup before any figure
        inst.scraper.start()
    return inst


def stop_instance(reg: procs.Registry, inst: Instance) -> dict[str, Any]:
    """Stop the scraper, the proxy, the chain; what the scraper and access log saw."""
    seen: dict[str, Any] = {}
    if inst.scraper is not None:
        seen["scrape"] = inst.scraper.stop()
        inst.scraper = None
    reg.stop(inst.proxy)
    for haproxy in inst.chain:
        reg.stop(haproxy)
    path = inst.doc.get("server", {}).get("access_log")
    if path and path != "-":
        try:
            with open(path, "rb") as f:
                seen["access_log_lines"] = sum(1 for _ in f)
        except OSError as exc:
            seen["access_log_lines"] = f"unreadable: {exc}"
    return seen


def workers_cpu(inst: Instance) -> float:
    return sum(procfs.process_cpu_seconds(pid) for pid in inst.workers)


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    opts: Options
    reg: procs.Registry
    redis_port: int | None = None
    hold_port: int | None = None
    samples: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.opts.log(f"NOTE: {msg}")

    def sample(self, round_no: int, variant: str, workload: str, metric: str,
               value: float | None) -> None:
        if value is not None:
            self.samples.append({"round": round_no, "variant": variant, "workload": workload,
                                 "metric": metric, "value": value})

    def redis_probe(self) -> procs.Probe:
        return tls_probe(self.opts.sni) if self.opts.tls else procs.probe_redis

    def block(self, round_no: int, variant: Variant) -> None:
        """One variant's block of one round (see the module docstring)."""
        opts, name = self.opts, variant.name
        foreign, started = procfs.ForeignCpu(), time.monotonic()
        bench = [w for w in ("keepalive", "newconn") if w in opts.workloads]
        if bench:
            self.bench_block(round_no, variant, bench)
        if "idle" in opts.workloads:
            self.idle_block(round_no, variant)
        span = time.monotonic() - started
        share = foreign.seconds() / (span * _cpus()) if span > 0 else 0.0
        self.runs.append({"round": round_no, "variant": name, "workload": "foreign_cpu",
                          "share": share})
        if share > 0.05:
            self.note(f"round {round_no}: {name}: other processes used {share:.0%} of the "
                      "machine while it was measured")

    def bench_block(self, round_no: int, variant: Variant, bench: list[str]) -> None:
        opts, name = self.opts, variant.name
        try:
            inst = start_instance(self.reg, opts, variant, self.redis_port, self.redis_probe(),
                                  f"r{round_no}-{name}")
        except (procs.StartError, OSError) as exc:
            self.note(f"round {round_no}: {name} failed to start: {str(exc)[-600:]}")
            return
        extra = ["--tls", "--sni", opts.sni, "--insecure"] if opts.tls else []
        try:
            for workload in bench:
                keepalive = workload == "keepalive"
                n = opts.keepalive_n if keepalive else opts.newconn_n
                time_wait = procfs.time_wait_sockets()
                w0, t0 = workers_cpu(inst), procfs.tree_cpu_seconds(inst.proxy.pid)
                raw = workloads.run_redis_benchmark(inst.client_port, opts.clients, n,
                                                    keepalive=keepalive, test=opts.test,
                                                    timeout=180, extra=extra)
                w1, t1 = workers_cpu(inst), procfs.tree_cpu_seconds(inst.proxy.pid)
                raw.update(time_wait_before=time_wait, worker_cpu_s=w1 - w0, tree_cpu_s=t1 - t0)
                self.runs.append({"round": round_no, "variant": name, "workload": workload,
                                  **raw})
                if "error" in raw:
                    self.note(f"round {round_no}: {name} {workload}: {raw['error']}")
                    continue
                for metric, value in (("rps", raw["rps"]), ("p99_ms", raw.get("p99_ms")),
                                      ("worker_cpu_us", (w1 - w0) * 1e6 / n),
                                      ("tree_cpu_us", (t1 - t0) * 1e6 / n)):
                    self.sample(round_no, name, workload, metric, value)
                opts.log(f"round {round_no} {name:10} {workload:9} {raw['rps']:,.0f}/s p99 "
                         f"{raw.get('p99_ms') or float('nan'):.3f} ms, workers "
                         f"{(w1 - w0) * 1e6 / n:.1f} µs/req, tree {(t1 - t0) * 1e6 / n:.1f}")
            if not inst.proxy.alive():
                self.note(f"round {round_no}: {name} had exited: {inst.proxy.stderr_tail(5)!r}")
        finally:
            seen = stop_instance(self.reg, inst)
            self.runs.append({"round": round_no, "variant": name, "workload": "instance",
                              **seen})
            if seen:
                opts.log(f"round {round_no} {name:10} saw {json.dumps(seen)}")
            failures = seen.get("scrape", {}).get("failures")
            if failures:
                self.note(f"round {round_no}: {name}: {failures} /metrics scrapes failed: "
                          f"{seen['scrape']['first_failures']}")

    def idle_block(self, round_no: int, variant: Variant) -> None:
        opts, name = self.opts, variant.name
        try:
            inst = start_instance(self.reg, opts, variant, self.hold_port, procs.probe_echo,
                                  f"r{round_no}-{name}-idle")
        except (procs.StartError, OSError) as exc:
            self.note(f"round {round_no}: {name} (idle) failed to start: {str(exc)[-600:]}")
            return
        try:
            raw = workloads.run_idle(inst.client_port, opts.idle_conns, inst.proxy.pid,
                                     detail=lambda: procfs.tree_pss_by_process(inst.proxy.pid))
        finally:
            seen = stop_instance(self.reg, inst)
        raw.update(seen)
        complete = raw["opened"] == opts.idle_conns == raw["alive_after_hold"]
        if not complete and "error" not in raw:
            raw["error"] = (f"only {raw['opened']}/{opts.idle_conns} opened, "
                            f"{raw['alive_after_hold']} alive after hold")
        self.runs.append({"round": round_no, "variant": name, "workload": "idle", **raw})
        if "error" in raw:
            self.note(f"round {round_no}: {name} idle: {raw['error']}")
            return
        self.sample(round_no, name, "idle", "kib_per_conn", raw["kib_per_conn"])
        opts.log(f"round {round_no} {name:10} idle      {raw['opened']} conns, PSS "
                 f"{raw['pss_before_kib']} -> {raw['pss_after_kib']} KiB: "
                 f"{raw['kib_per_conn']:.2f} KiB/conn")


def run(opts: Options) -> int:
    """The whole run: backends, the rounds, the table and JSON. 0, or 130 if interrupted."""
    names = [v.name for v in opts.variants]
    needed = ["redis-server", "redis-benchmark"] if set(opts.workloads) - {"idle"} else []
    needed += ["haproxy"] if opts.chain else []
    needed += ["openssl"] if opts.tls else []
    for binary in needed:
        if shutil.which(binary) is None:
            opts.log(f"`{binary}` not installed (scripts/install-peers or scripts/bench "
                     "installs it)")
            return 2

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = {sig: signal.signal(sig, interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} \
        if threading.current_thread() is threading.main_thread() else {}

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="prefork-variants-"))
    reg = procs.Registry(workdir)
    state = Run(opts, reg)
    interrupted = False
    deadline = time.monotonic() + opts.max_minutes * 60
    foreign_all, started = procfs.ForeignCpu(), time.monotonic()
    try:
        if needed[:1] == ["redis-server"]:
            state.redis_port = start_redis(reg, opts.tls, opts.sni)
            opts.log(f"redis-server on 127.0.0.1:{state.redis_port}"
                     + (f" (TLS only, certificate for {opts.sni})" if opts.tls else ""))
        if "idle" in opts.workloads:
            state.hold_port = start_hold(reg)
        for round_no in range(1, opts.rounds + 1):
            for name in rotated(names, round_no):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"max minutes ({opts.max_minutes:g}) reached in "
                                       f"round {round_no}")
                state.block(round_no, opts.variants[names.index(name)])
    except KeyboardInterrupt:
        interrupted = True
        opts.log("interrupted: stopping everything")
    except TimeoutError as exc:
        state.note(str(exc))
    finally:
        if previous:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C must not skip cleanup
        reg.stop_all()
        if opts.keep_temp:
            opts.log(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    span = time.monotonic() - started
    foreign = foreign_all.seconds()
    header = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.node()}, {_cpus()} CPUs, Linux {platform.release()}",
        "prefork-proxy": " ".join(opts.exe) + f" ({opts.workers} workers)",
        "around it": ("redis-benchmark -> HAProxy front -> prefork-proxy -> HAProxy back -> "
                      "backend" if opts.chain else "redis-benchmark -> prefork-proxy -> backend")
        + (f"; TLS clients (--tls --sni {opts.sni}) to a TLS-only redis" if opts.tls else ""),
        "redis-benchmark": f"-c {opts.clients} -t {opts.test}; -k 1 -n {opts.keepalive_n}, "
                           f"-k 0 -n {opts.newconn_n}",
        "workloads": ", ".join(opts.workloads)
        + (f" ({opts.idle_conns} idle connections, fresh instance each)"
           if "idle" in opts.workloads else ""),
        "scraper": (f"GET /metrics every {opts.scrape_interval:g} s where [admin] bind is set"
                    if opts.scrape_interval > 0 else "off"),
        "rounds": f"{opts.rounds} requested, variant order rotated per round",
        "load average before": " ".join(f"{x:.2f}" for x in load_before),
        "CPU used by other processes": (f"{foreign:.0f} CPU-s ({foreign / (span * _cpus()):.0%}"
                                        " of the machine)" if span > 0 else "n/a"),
        "wall time": f"{span:.0f} s" + (" (INTERRUPTED)" if interrupted else ""),
    }
    text = table(state.samples, names, header, state.notes, opts.variants)
    print(text)
    out = opts.out or Path("bench-results") / f"variants-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.md").write_text(text)
    (out / "variants.json").write_text(json.dumps(
        {"header": header, "variants": {v.name: v.spec for v in opts.variants},
         "notes": state.notes, "summary": summary(state.samples, names),
         "samples": state.samples, "runs": state.runs}, indent=1, default=str))
    opts.log(f"results: {out / 'variants.md'}, {out / 'variants.json'}")
    return 130 if interrupted else 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
