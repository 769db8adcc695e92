#!/usr/bin/env python3
"""Bytecode instructions per new connection (or request) in a worker's relay thread, by function.

    .venv/bin/python scripts/relay_opcodes.py [--exe PATH] [--workload newconn|keepalive] \\
        --variant plain= \\
        --variant 'admission=tcp_proxy.accept_proxy=v2,tcp_proxy.send_proxy=v2,...'

A count, not a timing: on this project's noisy 2-core machines one timed A/B
needs minutes to tell 3% apart, while the instruction count of the
per-connection path moves by about 1% from run to run (how many events one
epoll round carries varies), so a change to the hot path of a few dozen
instructions can be weighed in seconds.  It
does not replace a timed run (``ab_bench.py``): it counts neither system
calls nor the C work behind an instruction (a ``ctypes`` call, a ``recv``).

For each variant (the ``ab_bench.py variants`` syntax; the first is the
reference) it starts redis-server, HAProxy in front of and behind
prefork-proxy (``send-proxy-v2``/``accept-proxy`` where the variant needs a
PROXY header, as ``ab_bench.py variants --chain`` does), prefork-proxy with one
worker and one relay thread, traced by ``bench_lib/opcode_trace``; then
``redis-benchmark -k 0`` (a new connection per request, 10 clients) until the
relay has closed ``--connections`` connections, or with ``--workload
keepalive`` ``--requests`` kept-alive requests (``-k 1``, 50 clients; their
50 connects and closes are counted in too).  It prints instructions per
connection (or request) for each variant and the functions that differ most
from the reference (with one variant: its largest functions).
Needs haproxy, redis-server and redis-benchmark (``scripts/bench`` installs them).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep scripts/bench_lib free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import procs  # noqa: E402
from bench_lib.variant_run import start_redis  # noqa: E402
from bench_lib.variants import (  # noqa: E402
    Variant,
    base_document,
    chain_options,
    haproxy_chain_configs,
    merged,
    parse_variant,
    to_toml,
)

TRACER = Path(__file__).resolve().parent / "bench_lib" / "opcode_trace"
#: Seconds a traced run may take before it is given up (tracing is ~50x slower).
RUN_TIMEOUT_S = 300


def _counts(prefix: str) -> dict:
    """The relay thread's latest copy (one worker, one relay thread: one file)."""
    for path in glob.glob(f"{prefix}-*-relay-0.json"):
        try:
            with open(path) as source:
                return json.load(source)
        except (OSError, ValueError):  # replaced as we read it: the next one will do
            pass
    return {"at": 0.0, "closes": 0, "opcodes": 0, "by_function": {}}


def _copy_after(prefix: str, moment: float) -> dict:
    """The first copy the tracer took after ``moment`` (``time.monotonic()``)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = _counts(prefix)
        if counts["at"] > moment:
            return counts
        time.sleep(0.05)
    raise SystemExit(f"no count from the traced worker after 30 s ({prefix}-*.json)")


def _redis_benchmark(port: int, keepalive: bool, requests: int, clients: int) -> list[str]:
    return ["redis-benchmark", "-p", str(port), "-c", str(clients), "-k",
            "1" if keepalive else "0", "-t", "ping_mbulk", "-n", str(requests), "-q"]


def trace_variant(reg: procs.Registry, exe: list[str], variant: Variant, redis_port: int,
                  workload: str, count: int, log) -> dict:
    """One variant's counts: per new connection once the relay has closed ``count``
    (``workload`` newconn), or per request of ``count`` kept-alive requests."""
    workdir = reg.workdir / variant.name
    workdir.mkdir(parents=True, exist_ok=True)
    front_port, prefork_port, back_port = reg.free_port(), reg.free_port(), reg.free_port()
    doc = merged(base_document(prefork_port, back_port, 1), variant,
                 {"PORT": str(reg.free_port()), "BACKEND": f"127.0.0.1:{back_port}",
                  "RUNDIR": str(workdir)})
    doc["server"]["threads"] = 1
    config = workdir / "prefork.toml"
    config.write_text(to_toml(doc))
    send, accept = chain_options(doc["tcp_proxy"][0])
    started = []
    for part, text in zip(("front", "back"), haproxy_chain_configs(
            front_port, prefork_port, back_port, redis_port, send, accept)):
        path = workdir / f"haproxy-{part}.cfg"
        path.write_text(text)
        started.append(reg.start(f"{variant.name}-haproxy-{part}", ["haproxy", "-db", "-f",
                                                                    str(path)]))
    prefix = str(workdir / "opcodes")
    env = dict(os.environ, PREFORK_OPCODE_TRACE=prefix,
               PYTHONPATH=os.pathsep.join([str(TRACER), os.environ.get("PYTHONPATH", "")]))
    proxy = reg.start(f"{variant.name}-prefork", [*exe, "start", "--config", str(config)],
                      env=env, cwd=workdir)
    started.append(proxy)
    try:
        procs.wait_ready(proxy, front_port, procs.probe_redis, timeout=60)
        # Counted from here: boot and the readiness probes are not the workload's.
        before = _copy_after(prefix, time.monotonic())
        keepalive = workload == "keepalive"
        argv = _redis_benchmark(front_port, keepalive, count if keepalive else 10 * count + 1000,
                                50 if keepalive else 10)
        bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while time.monotonic() < deadline and bench.poll() is None:
                if not keepalive and _counts(prefix)["closes"] - before["closes"] >= count:
                    break
                time.sleep(0.25)
            finished = bench.poll() == 0
        finally:
            bench.kill()
            bench.wait()
        after = _copy_after(prefix, time.monotonic())
    finally:
        for proc in reversed(started):
            reg.stop(proc)
    if keepalive:
        if not finished:
            raise SystemExit(f"{variant.name}: redis-benchmark did not finish {count} "
                             f"requests within {RUN_TIMEOUT_S} s")
        units = count
    else:
        units = after["closes"] - before["closes"]
        if units <= 0:
            raise SystemExit(f"{variant.name}: the relay closed no connection "
                             f"(see {reg.workdir / 'logs'})")
    per = {name: (value - before["by_function"].get(name, 0)) / units
           for name, value in after["by_function"].items()}
    log(f"{variant.name}: {units} {'requests' if keepalive else 'connections'} traced")
    return {"units": units, "per_unit": (after["opcodes"] - before["opcodes"]) / units,
            "by_function": per}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exe", default=None,
                        help="prefork-proxy to trace (default: the one beside this Python)")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=section.key=value,... (the first is the reference)")
    parser.add_argument("--workload", choices=["newconn", "keepalive"], default="newconn",
                        help="newconn: per new connection (redis-benchmark -k 0, 10 "
                        "clients); keepalive: per request (-k 1, 50 clients, their 50 "
                        "connects and closes included)")
    parser.add_argument("--connections", type=int, default=2000,
                        help="newconn: connections counted per variant (default 2000)")
    parser.add_argument("--requests", type=int, default=20000,
                        help="keepalive: requests per variant (default 20000)")
    parser.add_argument("--top", type=int, default=25, help="functions shown (default 25)")
    parser.add_argument("--json", type=Path, help="write every count here too")
    args = parser.parse_args()
    for tool in ("haproxy", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: ./scripts/bench installs it")
    exe = [args.exe] if args.exe else [str(Path(sys.executable).with_name("prefork-proxy"))]
    variants = [parse_variant(spec) for spec in args.variant]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="relay-opcodes-") as workdir:
        reg = procs.Registry(Path(workdir))
        try:
            redis_port = start_redis(reg, False, "")
            for variant in variants:
                results[variant.name] = trace_variant(
                    reg, exe, variant, redis_port, args.workload,
                    args.requests if args.workload == "keepalive" else args.connections, log)
        finally:
            reg.stop_all()
    reference = variants[0].name
    base = results[reference]
    unit = "request" if args.workload == "keepalive" else "connection"
    print(f"| variant | instructions per {unit} | ratio |")
    print("|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['per_unit']:,.0f} | "
              f"{result['per_unit'] / base['per_unit']:.3f} |")
    for name, result in list(results.items())[1:]:
        names = set(base["by_function"]) | set(result["by_function"])
        delta = {n: result["by_function"].get(n, 0.0) - base["by_function"].get(n, 0.0)
                 for n in names}
        print(f"\n{name} - {reference}, per {unit}, largest differences first:")
        for function in sorted(delta, key=lambda n: -abs(delta[n]))[:args.top]:
            print(f"  {delta[function]:+8.1f}  ({base['by_function'].get(function, 0.0):7.1f}"
                  f" -> {result['by_function'].get(function, 0.0):7.1f})  {function}")
    if len(results) == 1:
        print(f"\n{reference}, per {unit}:")
        ranked = sorted(base["by_function"].items(), key=lambda kv: -kv[1])
        for function, count in ranked[:args.top]:
            print(f"  {count:8.1f}  {function}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
