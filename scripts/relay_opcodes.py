#!/usr/bin/env python3
"""Bytecode instructions per new connection in a worker's relay thread, by function.

    .venv/bin/python scripts/relay_opcodes.py [--exe PATH] [--connections 2000] \\
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
``redis-benchmark -k 0`` (a new connection per request) until the relay has
closed ``--connections`` connections.  It prints instructions per connection for
each variant and the functions that differ most from the reference.
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
    """The relay thread's dump (one worker, one relay thread: one file)."""
    files = glob.glob(f"{prefix}-*-relay-0.json")
    if not files:
        return {"closes": 0, "opcodes": 0, "by_function": {}}
    with open(files[0]) as source:
        return json.load(source)


def trace_variant(reg: procs.Registry, exe: list[str], variant: Variant, redis_port: int,
                  connections: int, log) -> dict:
    """One variant's counts once its relay has closed ``connections`` connections."""
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
        # Counted from here: boot and the readiness probes are not per-connection work.
        time.sleep(0.5)
        before = _counts(prefix)
        bench = subprocess.Popen(["redis-benchmark", "-p", str(front_port), "-c", "10", "-k",
                                  "0", "-t", "ping_mbulk", "-n", str(10 * connections + 1000),
                                  "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while time.monotonic() < deadline and bench.poll() is None:
                if _counts(prefix)["closes"] - before["closes"] >= connections:
                    break
                time.sleep(0.5)
        finally:
            bench.kill()
            bench.wait()
        after = _counts(prefix)
    finally:
        for proc in reversed(started):
            reg.stop(proc)
    closes = after["closes"] - before["closes"]
    if closes <= 0:
        raise SystemExit(f"{variant.name}: the relay closed no connection "
                         f"(see {reg.workdir / 'logs'})")
    per = {name: (count - before["by_function"].get(name, 0)) / closes
           for name, count in after["by_function"].items()}
    log(f"{variant.name}: {closes} connections traced")
    return {"closes": closes, "per_connection": (after["opcodes"] - before["opcodes"]) / closes,
            "by_function": per}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exe", default=None,
                        help="prefork-proxy to trace (default: the one beside this Python)")
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=section.key=value,... (the first is the reference)")
    parser.add_argument("--connections", type=int, default=2000,
                        help="connections counted per variant (default 2000)")
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
                results[variant.name] = trace_variant(reg, exe, variant, redis_port,
                                                      args.connections, log)
        finally:
            reg.stop_all()
    reference = variants[0].name
    base = results[reference]
    print("| variant | instructions per connection | ratio |")
    print("|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['per_connection']:,.0f} | "
              f"{result['per_connection'] / base['per_connection']:.3f} |")
    for name, result in list(results.items())[1:]:
        names = set(base["by_function"]) | set(result["by_function"])
        delta = {n: result["by_function"].get(n, 0.0) - base["by_function"].get(n, 0.0)
                 for n in names}
        print(f"\n{name} - {reference}, per connection, largest differences first:")
        for function in sorted(delta, key=lambda n: -abs(delta[n]))[:args.top]:
            print(f"  {delta[function]:+8.1f}  ({base['by_function'].get(function, 0.0):7.1f}"
                  f" -> {result['by_function'].get(function, 0.0):7.1f})  {function}")
    if len(results) == 1:
        print(f"\n{reference}, per connection:")
        ranked = sorted(base["by_function"].items(), key=lambda kv: -kv[1])
        for function, count in ranked[:args.top]:
            print(f"  {count:8.1f}  {function}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
