#!/usr/bin/env python3
"""Balancer cost figures: per-connection pick cost for 2 vs 1,000 backends, schedule recompute.

Pure in-process measurements of ``prefork_proxy.balancer`` (no sockets, no
other process): robust on a loaded machine because each figure is the median
of many short batches. What is timed:

- pick: ``next(balancer.targets(client))`` then ``target.report(RELEASED)``,
  what a relay thread does per accepted connection before it connects (the
  ticket draw, the choice, the shared connection count up and down), per
  algorithm, every backend up. ``source_hash`` cycles through 1,000 client
  addresses (each seen before after the first round), and then takes a new
  address for every pick (its worst case: every backend hashed).
- recompute: a backend goes down (``active_down``, as a health check marks
  it), then the first pick after it, which rebuilds the list of up backends
  and its schedule; a different backend each time, so nothing is cached.

Usage: scripts/balancer_figures.py [--batches 31] [--picks 2000] [--recomputes 21]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefork_proxy import config  # noqa: E402
from prefork_proxy.balancer import Balancer  # noqa: E402
from prefork_proxy.relay import RELEASED  # noqa: E402
from prefork_proxy.shared import SharedState  # noqa: E402

ALGORITHMS = ["round_robin", "least_conn", "random_two", "source_hash"]


def make_balancer(weights: list[int], balance: str) -> Balancer:
    """A balancer over ``len(weights)`` loopback IP literals (never connected to)."""
    backends = ", ".join(f'{{ address = "127.0.{i // 250}.{i % 250 + 1}:9", weight = {w} }}'
                         for i, w in enumerate(weights))
    loaded = config.load_text(f'[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbalance = "{balance}"\n'
                              f"backends = [{backends}]\n")
    return Balancer(loaded.listeners[0], SharedState(loaded), 0)


def pick_costs_us(balancers: list[Balancer], batches: int, picks: int,
                  new_clients: bool = False) -> list[float]:
    """Median CPU time per pick of each balancer, their batches interleaved.

    CPU time of this process (``process_time``), not wall time: other
    processes taking the CPU do not count, and interleaving spreads slow drift
    over every balancer alike.
    """
    clients = [(f"10.1.{i // 250}.{i % 250 + 1}", 40000) for i in range(1000)]
    if new_clients:  # an address never seen before for every pick (source_hash's worst case)
        fresh = iter([(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1)
                      for i in range(2 * batches * picks + 4096)])
    for balancer in balancers:  # warm up: first view, schedule, every client seen once
        for client in clients:
            next(balancer.targets(client)).report(RELEASED, "")
    results: list[list[float]] = [[] for _ in balancers]
    for _ in range(batches):
        for balancer, out in zip(balancers, results):
            targets = balancer.targets
            started = time.process_time()
            if new_clients:
                batch = [next(fresh) for _ in range(picks)]
                started = time.process_time()
                for client in batch:
                    next(targets(client)).report(RELEASED, "")
                out.append((time.process_time() - started) / picks * 1e6)
                continue
            for j in range(picks):
                next(targets(clients[j % 1000])).report(RELEASED, "")
            out.append((time.process_time() - started) / picks * 1e6)
    return [statistics.median(out) for out in results]


def recompute_ms(balancer: Balancer, times: int) -> float:
    table, members = balancer.table, balancer.members()
    next(balancer.targets())
    results = []
    for k in range(times):
        slot = members[(k * 7) % len(members)].slot
        table.active_down[slot] = 1
        started = time.process_time()
        next(balancer.targets()).report(RELEASED, "")
        results.append((time.process_time() - started) * 1e3)
        table.active_down[slot] = 0
    return statistics.median(results)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=31)
    parser.add_argument("--picks", type=int, default=2000)
    parser.add_argument("--recomputes", type=int, default=21)
    args = parser.parse_args(argv)
    rng = random.Random(15)
    small = [rng.randint(1, 10) for _ in range(2)]
    large = [rng.randint(1, 10) for _ in range(1000)]
    print(f"pick cost, median of {args.batches} interleaved batches of {args.picks} picks "
          f"(CPU us per pick); "
          f"weights 1-10 (2 backends: {small[0]}:{small[1]})")
    print(f"{'algorithm':<26} {'2 backends':>11} {'1000 backends':>14} {'ratio':>7}")
    for balance in ALGORITHMS:
        two, many = pick_costs_us([make_balancer(small, balance), make_balancer(large, balance)],
                                  args.batches, args.picks)
        print(f"{balance:<26} {two:>11.2f} {many:>14.2f} {many / two:>6.2f}x")
    two, many = pick_costs_us([make_balancer([1, 1], "round_robin"),
                               make_balancer([1] * 1000, "round_robin")],
                              args.batches, args.picks)
    print(f"{'round_robin, equal weights':<26} {two:>11.2f} {many:>14.2f} {many / two:>6.2f}x")
    two, many = pick_costs_us([make_balancer(small, "source_hash"),
                               make_balancer(large, "source_hash")],
                              max(3, args.batches // 4), args.picks // 4, new_clients=True)
    print(f"{'source_hash, new clients':<26} {two:>11.2f} {many:>14.2f} {many / two:>6.2f}x")
    print(f"\nrecompute after a backend goes down (first pick after it), median of "
          f"{args.recomputes}, CPU ms")
    for label, weights in (("1000 backends, weights 1-10", large),
                           ("100 backends, weight 1000", [1000] * 100),
                           ("1000 backends, weights 1-1000", [rng.randint(1, 1000)
                                                              for _ in range(1000)])):
        for balance in ("round_robin", "random_two"):
            value = recompute_ms(make_balancer(weights, balance), args.recomputes)
            print(f"  {label:<30} {balance:<12} {value:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
