#!/usr/bin/env python3
"""Interleaved A/B of two prefork-proxy installs, with HAProxy as a yardstick.

Who uses it: a developer checking that a change kept the relay's speed (issue
10: "an interleaved A/B of the commit before and after ... medians within the
machine's noise"). It runs in the foreground, from a shell; it owns every
process it starts (one redis-server, then one proxy at a time) and stops them
all at the end, on Ctrl-C or SIGTERM too.

Two steps (see scripts/BENCH.md, "A/B of two commits"):

* ``install NAME (--rev REV [--repo DIR] | --src DIR)``: ``git archive`` of
  REV (or a copy of DIR, without .git/.venv) into ``ROOT/NAME-src``, a fresh
  ``ROOT/NAME-venv`` and a plain (non-editable) ``pip install`` of the copy.
  The copy keeps pip's build files out of the source tree.
* ``variants --variant NAME=SPEC ...``: one install, several config variants
  of its listener, interleaved the same way (bench_lib/variant_run.py): the
  side-by-side cost of a feature (issues 11, 12, 13, 15).
* ``run``: N rounds (default 5). In each round, for each peer of [old, new,
  haproxy] in an order rotated by one from round to round: start the proxy in
  front of the one redis-server (prefork-proxy at its defaults with
  ``--workers 2``; HAProxy ``mode tcp``, ``nbthread 2`` as scripts/bench
  configures it), run ``redis-benchmark -k 1`` (kept-alive) and ``-k 0`` (new
  connection per request), 50 clients, stop the proxy. Then a table of
  medians, min-max over the rounds, and the ratios new/old and new/haproxy
  (of the medians, plus the min-max of the per-round ratio), and JSON.

Everything is on 127.0.0.1. Every step is bounded: readiness 20 s, each
redis-benchmark run 180 s, the whole run ``--max-minutes``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep scripts/bench_lib free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import growth, procfs, procs, variant_run, workloads  # noqa: E402
from bench_lib.peers import PeerOptions, haproxy_argv, prefork_argv  # noqa: E402
from bench_lib.variants import VariantError, parse_variant  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path("/tmp/ab")
PEERS = ["old", "new", "haproxy"]
#: (workload, redis-benchmark keep-alive flag)
WORKLOADS = [("keepalive", True), ("newconn", False)]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "bench-results", "__pycache__", "build",
                                     "*.egg-info", ".pytest_cache", ".ruff_cache")
PIP_TIMEOUT = 600

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- install

def install(args: argparse.Namespace) -> int:
    """ROOT/NAME-src (a copy) -> fresh ROOT/NAME-venv with prefork-proxy installed."""
    root: Path = args.root
    src, venv = root / f"{args.name}-src", root / f"{args.name}-venv"
    root.mkdir(parents=True, exist_ok=True)
    for path in (src, venv):
        shutil.rmtree(path, ignore_errors=True)
    if args.src:
        source = f"directory {args.src.resolve()} ({_describe(args.src)})"
        shutil.copytree(args.src, src, ignore=COPY_IGNORE)
    else:
        commit = _git(args.repo, "rev-parse", args.rev)
        subject = _git(args.repo, "log", "-1", "--format=%s", commit)[:70]
        source = f"commit {commit} of {args.repo.resolve()} ({subject})"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(args.repo), "archive", commit],
                                 capture_output=True, check=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True, timeout=60)
    log(f"{args.name}: {source} -> {src}")
    python = args.python or sys.executable
    version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0], "
                              "sys.executable)"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip()
    source += f"; Python {version}"
    log(f"{args.name}: venv from Python {version}")
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], check=True,
                   timeout=PIP_TIMEOUT)
    (venv / "ab-source.txt").write_text(source + "\n")
    exe = venv / "bin" / "prefork-proxy"
    subprocess.run([str(exe), "start", "--help"], check=True, capture_output=True, timeout=30,
                   env=_clean_env())
    log(f"{args.name}: installed {exe}")
    return 0


def _git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()


def _describe(path: Path) -> str:
    try:
        head = _git(path, "rev-parse", "--short", "HEAD")
        dirty = _git(path, "status", "--porcelain", "--", "prefork_proxy")
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        return "not a git checkout"
    return f"HEAD {head}" + (" + uncommitted changes in prefork_proxy/" if dirty else "")


def _clean_env() -> dict[str, str]:
    # No PYTHONPATH: a venv's prefork-proxy must import its own installed copy,
    # never a checkout's package that a PYTHONPATH would put before site-packages.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


# --------------------------------------------------------------------------- run

def rotated(peers: list[str], round_no: int) -> list[str]:
    """Round 1: old, new, haproxy; round 2: new, haproxy, old; ..."""
    k = (round_no - 1) % len(peers)
    return peers[k:] + peers[:k]


def start_proxy(reg: procs.Registry, peer: str, exe: dict[str, Path], redis_port: int,
                notes: list[str]) -> tuple[procs.Managed, int]:
    port = reg.free_port()
    rundir = reg.workdir / peer
    rundir.mkdir(parents=True, exist_ok=True)
    if peer == "haproxy":
        proc = reg.start(peer, haproxy_argv(rundir, port, redis_port))
    else:
        argv = prefork_argv(PeerOptions([str(exe[peer])], None), port, redis_port)
        proc = reg.start(peer, argv, env=_clean_env(), cwd=rundir)
    procs.wait_ready(proc, port, procs.probe_redis, timeout=20)
    if peer != "haproxy":
        # The round trip proves one worker serves; wait (bounded) for both to
        # have booted, so the run does not start on one worker.
        deadline = time.monotonic() + 20
        while len(growth.booted_pids(proc.stderr_path, 0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(growth.booted_pids(proc.stderr_path, 0)) < 2:
            notes.append(f"{peer}: fewer than 2 'worker N booted' lines within 20 s")
    return proc, port


def run(args: argparse.Namespace) -> int:
    exe = {"old": args.old or args.root / "old-venv" / "bin" / "prefork-proxy",
           "new": args.new or args.root / "new-venv" / "bin" / "prefork-proxy"}
    for name, path in exe.items():
        if not (path.is_file() and os.access(path, os.X_OK)):
            log(f"{name}: {path} is not an executable; run `{Path(__file__).name} install "
                f"{name} ...` first (scripts/BENCH.md)")
            return 2
    for binary in ("redis-server", "redis-benchmark", "haproxy"):
        if shutil.which(binary) is None:
            log(f"`{binary}` not installed (scripts/install-peers or scripts/bench installs it)")
            return 2
    sources = {name: _source_of(path) for name, path in exe.items()}
    for name in exe:
        log(f"{name}: {exe[name]} = {sources[name]}")

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="prefork-ab-"))
    reg = procs.Registry(workdir)
    samples: list[dict] = []
    runs: list[dict] = []
    notes: list[str] = []
    interrupted = False
    deadline = time.monotonic() + args.max_minutes * 60
    foreign_all = procfs.ForeignCpu()
    started = time.monotonic()
    try:
        redis_port = reg.free_port()
        redis = reg.start("redis", [
            "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
            "--dir", str(workdir), "--logfile", ""])
        procs.wait_ready(redis, redis_port, procs.probe_redis)
        log(f"redis-server on 127.0.0.1:{redis_port}")
        for round_no in range(1, args.rounds + 1):
            for peer in rotated(PEERS, round_no):
                if time.monotonic() > deadline:
                    notes.append(f"--max-minutes {args.max_minutes} reached in round {round_no}")
                    raise TimeoutError
                one_peer(reg, peer, round_no, exe, redis_port, args, samples, runs, notes)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything")
    except TimeoutError:
        log(notes[-1])
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        reg.stop_all()
        if args.keep_temp:
            log(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    span = time.monotonic() - started
    foreign = foreign_all.seconds()
    header = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.node()}, {len(os.sched_getaffinity(0))} CPUs, "
                   f"Linux {platform.release()}",
        "old": f"{exe['old']} = {sources['old']}",
        "new": f"{exe['new']} = {sources['new']}",
        "haproxy": "mode tcp, nbthread 2 (scripts/bench_lib/peers.haproxy_argv)",
        "prefork": "start --bind … --backend … --workers 2 (defaults otherwise)",
        "redis-benchmark": f"-c {args.clients} -t {args.test}; -k 1 -n {args.keepalive_n}, "
                           f"-k 0 -n {args.newconn_n}",
        "rounds": f"{args.rounds} requested, order rotated per round",
        "load average before": " ".join(f"{x:.2f}" for x in load_before),
        "CPU used by other processes": f"{foreign:.0f} CPU-s "
                                       f"({foreign / (span * len(os.sched_getaffinity(0))):.0%} "
                                       "of the machine)" if span > 0 else "n/a",
        "wall time": f"{time.monotonic() - T0:.0f} s" + (" (INTERRUPTED)" if interrupted else ""),
    }
    text = table(samples, header, notes)
    print(text)
    out = args.out or Path("bench-results") / f"ab-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.md").write_text(text)
    (out / "ab.json").write_text(json.dumps(
        {"header": header, "notes": notes, "summary": summary(samples), "samples": samples,
         "runs": runs}, indent=1, default=str))
    log(f"results: {out / 'ab.md'}, {out / 'ab.json'}")
    return 130 if interrupted else 0


def one_peer(reg: procs.Registry, peer: str, round_no: int, exe: dict[str, Path],
             redis_port: int, args: argparse.Namespace, samples: list[dict], runs: list[dict],
             notes: list[str]) -> None:
    foreign, t_start = procfs.ForeignCpu(), time.monotonic()
    try:
        proc, port = start_proxy(reg, peer, exe, redis_port, notes)
    except (procs.StartError, OSError) as exc:
        notes.append(f"round {round_no}: {peer} failed to start: {exc}")
        log(notes[-1])
        return
    try:
        for workload, keepalive in WORKLOADS:
            n = args.keepalive_n if keepalive else args.newconn_n
            time_wait = procfs.time_wait_sockets()
            raw = workloads.run_redis_benchmark(port, args.clients, n, keepalive=keepalive,
                                                test=args.test, timeout=180)
            runs.append({"round": round_no, "peer": peer, "workload": workload,
                         "time_wait_before": time_wait, **raw})
            if "error" in raw:
                notes.append(f"round {round_no}: {peer} {workload}: {raw['error']}")
                log(notes[-1])
                continue
            shown = []
            for row in raw["all_rows"]:
                for metric in ("rps", "p99_latency_ms"):
                    if row.get(metric) is not None:
                        samples.append({"round": round_no, "peer": peer, "workload": workload,
                                        "test": row["test"], "metric": metric,
                                        "value": row[metric]})
                shown.append(f"{row['test']} {row['rps']:,.0f}/s p99 "
                             f"{row.get('p99_latency_ms', float('nan')):.3f} ms")
            log(f"round {round_no} {peer:7} {workload:9} " + "; ".join(shown))
        if not proc.alive():
            notes.append(f"round {round_no}: {peer} had exited: {proc.stderr_tail(5)!r}")
    finally:
        reg.stop(proc)
    span = time.monotonic() - t_start
    share = foreign.seconds() / (span * len(os.sched_getaffinity(0))) if span > 0 else 0.0
    runs.append({"round": round_no, "peer": peer, "workload": "foreign_cpu", "share": share})
    if share > 0.05:
        notes.append(f"round {round_no}: {peer}: other processes used {share:.0%} of the "
                     "machine while it was measured")


def _source_of(exe: Path) -> str:
    marker = exe.parent.parent / "ab-source.txt"
    try:
        return marker.read_text().strip()
    except OSError:
        return "unknown source (not installed by ab_bench.py install)"


# --------------------------------------------------------------------------- report

def summary(samples: list[dict]) -> list[dict]:
    """One row per (workload, test, metric): each peer's median, min, max, n, and ratios."""
    keys = sorted({(s["workload"], s["test"], s["metric"]) for s in samples},
                  key=lambda k: ([w for w, _ in WORKLOADS].index(k[0]), k[1], k[2] != "rps"))
    rows = []
    for workload, test, metric in keys:
        by_peer: dict[str, dict[int, float]] = {p: {} for p in PEERS}
        for s in samples:
            if (s["workload"], s["test"], s["metric"]) == (workload, test, metric):
                by_peer[s["peer"]][s["round"]] = s["value"]
        row: dict = {"workload": workload, "test": test, "metric": metric}
        for peer, values in by_peer.items():
            v = list(values.values())
            row[peer] = ({"median": statistics.median(v), "min": min(v), "max": max(v),
                          "n": len(v)} if v else None)
        for base in ("old", "haproxy"):
            new, other = row["new"], row[base]
            row[f"new/{base}"] = new["median"] / other["median"] if new and other else None
            paired = [by_peer["new"][r] / by_peer[base][r] for r in by_peer["new"]
                      if by_peer[base].get(r)]
            row[f"new/{base} per round"] = [min(paired), max(paired)] if paired else None
        rows.append(row)
    return rows


def table(samples: list[dict], header: dict, notes: list[str]) -> str:
    lines = ["# A/B: prefork-proxy old vs new, HAProxy as yardstick", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "Medians over the rounds (min–max). Ratios: of the medians; in brackets, the "
              "min–max of the same ratio taken round by round.", "",
              "| workload | test | metric | old | new | haproxy | new/old | new/haproxy |",
              "|---|---|---|---|---|---|---|---|"]
    for row in summary(samples):
        unit = "req/s" if row["metric"] == "rps" else "p99 ms"
        fmt = _fmt_rate if row["metric"] == "rps" else _fmt_ms
        cells = []
        for peer in PEERS:
            st = row[peer]
            cells.append("—" if st is None else
                         f"{fmt(st['median'])} ({fmt(st['min'])}–{fmt(st['max'])}, n={st['n']})")
        for base in ("old", "haproxy"):
            r, pr = row[f"new/{base}"], row[f"new/{base} per round"]
            cells.append("—" if r is None else
                         f"{r:.3f}" + (f" [{pr[0]:.3f}–{pr[1]:.3f}]" if pr else ""))
        lines.append(f"| {row['workload']} | {row['test']} | {unit} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _fmt_ms(value: float) -> str:
    return f"{value:.3g}"


# --------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Interleaved A/B of two prefork-proxy installs "
                                "(see scripts/BENCH.md, 'A/B of two commits').")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path, default=DEFAULT_ROOT,
                        help=f"where NAME-src and NAME-venv live (default {DEFAULT_ROOT})")
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("install", parents=[common], help="copy a commit or directory and "
                         "pip-install it into ROOT/NAME-venv")
    ins.add_argument("name", choices=["old", "new"])
    what = ins.add_mutually_exclusive_group(required=True)
    what.add_argument("--rev", help="a commit/branch of --repo, copied with git archive")
    what.add_argument("--src", type=Path, help="a directory (a checkout), copied without .git")
    ins.add_argument("--repo", type=Path, default=REPO_ROOT,
                     help="the git repo of --rev (default: this checkout)")
    ins.add_argument("--python", help="the interpreter that makes ROOT/NAME-venv (default: the "
                     "one running this script). Builds differ: README, Performance")
    r = sub.add_parser("run", parents=[common], help="the interleaved rounds")
    r.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    r.add_argument("-n", type=int, dest="n", help="requests of BOTH runs (a smoke test); "
                   "default: --keepalive-n and --newconn-n")
    r.add_argument("--keepalive-n", type=int, default=100_000,
                   help="redis-benchmark -k 1 -n (default 100000, as scripts/bench)")
    r.add_argument("--newconn-n", type=int, default=20_000,
                   help="redis-benchmark -k 0 -n (default 20000, as scripts/bench)")
    r.add_argument("--clients", type=int, default=50, help="redis-benchmark -c (default 50)")
    r.add_argument("--test", default="ping",
                   help="redis-benchmark -t (default ping: PING_INLINE and PING_MBULK, each "
                        "reported; scripts/bench uses ping_mbulk)")
    r.add_argument("--old", type=Path, help="old prefork-proxy (default ROOT/old-venv/bin/...)")
    r.add_argument("--new", type=Path, help="new prefork-proxy (default ROOT/new-venv/bin/...)")
    r.add_argument("--max-minutes", type=float, default=60,
                   help="stop starting new peers after this long (default 60)")
    r.add_argument("--out", type=Path, help="output dir (default bench-results/ab-<timestamp>)")
    r.add_argument("--keep-temp", action="store_true", help="keep the logs' temp dir")
    v = sub.add_parser("variants", parents=[common], help="config variants of one install, "
                       "interleaved (the first variant is the reference)")
    v.add_argument("--variant", action="append", required=True, metavar="NAME=SPEC",
                   help="NAME= (base config), NAME=SECTION.KEY=VALUE,... or NAME=@FILE.toml; "
                        "PORT, BACKEND, RUNDIR are replaced (scripts/BENCH.md)")
    v.add_argument("--exe", type=Path, help="the prefork-proxy executable "
                   "(default ROOT/new-venv/bin/prefork-proxy)")
    v.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    v.add_argument("-n", type=int, dest="n", help="requests of BOTH redis-benchmark runs")
    v.add_argument("--keepalive-n", type=int, default=100_000, help="-k 1 -n (default 100000)")
    v.add_argument("--newconn-n", type=int, default=20_000, help="-k 0 -n (default 20000)")
    v.add_argument("--clients", type=int, default=50, help="redis-benchmark -c (default 50)")
    v.add_argument("--test", default="ping_mbulk", help="redis-benchmark -t (default ping_mbulk)")
    v.add_argument("--workloads", type=lambda s: [w.strip() for w in s.split(",") if w.strip()],
                   default=["keepalive", "newconn"],
                   help="comma-separated, from keepalive,newconn,idle (default keepalive,newconn)")
    v.add_argument("--idle-conns", type=int, default=5000,
                   help="idle workload: connections held (default 5000)")
    v.add_argument("--chain", action="store_true", help="HAProxy front and back around "
                   "prefork-proxy (PROXY headers where the variant needs them)")
    v.add_argument("--tls", action="store_true", help="TLS-only redis backend, TLS clients")
    v.add_argument("--sni", default="bench.test", help="the server name (default bench.test)")
    v.add_argument("--scrape-interval", type=float, default=1.0,
                   help="GET /metrics this often where [admin] bind is set (0: off; default 1)")
    v.add_argument("--workers", type=int, default=2, help="[server] workers (default 2)")
    v.add_argument("--max-minutes", type=float, default=60,
                   help="stop starting new blocks after this long (default 60)")
    v.add_argument("--out", type=Path,
                   help="output dir (default bench-results/variants-<timestamp>)")
    v.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    if args.command == "variants":
        if args.n is not None:
            args.keepalive_n = args.newconn_n = args.n
        bad = [w for w in args.workloads if w not in variant_run.WORKLOADS]
        if bad or not args.workloads:
            p.error(f"--workloads: unknown {bad}; choose from {variant_run.WORKLOADS}")
        if not (1 <= args.rounds <= 50 and 1 <= args.keepalive_n <= 2_000_000
                and 1 <= args.newconn_n <= 200_000 and 1 <= args.clients <= 1000
                and 1 <= args.idle_conns <= 9000 and 1 <= args.workers <= 16
                and args.scrape_interval >= 0):
            p.error("bounds: 1 ≤ rounds ≤ 50, requests ≤ 2,000,000 (-k 1) / 200,000 (-k 0), "
                    "clients ≤ 1000, idle conns ≤ 9000, workers ≤ 16")
    if args.command == "run":
        if args.n is not None:
            args.keepalive_n = args.newconn_n = args.n
        if not (1 <= args.rounds <= 50 and 1 <= args.keepalive_n <= 2_000_000
                and 1 <= args.newconn_n <= 200_000 and 1 <= args.clients <= 1000):
            p.error("bounds: 1 ≤ rounds ≤ 50, requests ≤ 2,000,000 (-k 1) / 200,000 (-k 0), "
                    "clients ≤ 1000")
    return args


def variants(args: argparse.Namespace) -> int:
    """Config variants of ONE install side by side (bench_lib/variant_run.py)."""
    # Absolute: each instance runs in its own directory.
    exe = (args.exe or args.root / "new-venv" / "bin" / "prefork-proxy").absolute()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        log(f"{exe} is not an executable; run `{Path(__file__).name} install new ...` first "
            "or pass --exe (scripts/BENCH.md)")
        return 2
    try:
        specs = [parse_variant(spec) for spec in args.variant]
    except VariantError as exc:
        log(str(exc))
        return 2
    if len({v.name for v in specs}) != len(specs):
        log("--variant: every NAME must be different")
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the idle workload's sockets
    log(f"prefork-proxy: {exe} = {_source_of(exe)}")
    opts = variant_run.Options(
        exe=[str(exe)], variants=specs, rounds=args.rounds, keepalive_n=args.keepalive_n,
        newconn_n=args.newconn_n, clients=args.clients, test=args.test,
        workloads=tuple(args.workloads), idle_conns=args.idle_conns, chain=args.chain,
        tls=args.tls, sni=args.sni, scrape_interval=args.scrape_interval,
        workers=args.workers, max_minutes=args.max_minutes, out=args.out,
        keep_temp=args.keep_temp, env=_clean_env(), log=log)
    return variant_run.run(opts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return {"install": install, "run": run, "variants": variants}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
