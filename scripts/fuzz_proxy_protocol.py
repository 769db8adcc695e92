#!/usr/bin/env python3
"""Fuzz the PROXY protocol parser: a seeded random loop, counts printed at the end.

Usage: .venv/bin/python scripts/fuzz_proxy_protocol.py [--cases 100000] [--seed 12]

Each case is one buffer: a valid header from the encoders (round trip), a mutated
valid header (bytes flipped, set to CR/LF/NUL/space, inserted, deleted, cut), a
valid start followed by random bytes, or random bytes.  For every case, every
prefix of the buffer is parsed, in a random version mode, and checked:

* nothing but ProxyHeaderError is raised, and its reason is in REASONS;
* the answers are NeedMore (at_least >= 1) until one prefix decides, and every
  longer prefix gives that same answer (split invariance);
* a header never claims more than the buffer: v2 exactly 16 + len, v1 at most
  107 bytes ending in its first CRLF;
* an unmutated header parses back to what was encoded.

Exits 1 when any check failed (the first few failures are printed).
Deterministic for a given seed.  Pure CPU; no sockets, no files.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from prefork_proxy import proxy_protocol as pp  # noqa: E402

STARTS = [b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", pp.V2_SIGNATURE,
          pp.V2_SIGNATURE + b"\x21\x11", pp.V2_SIGNATURE + b"\x21\x21\x00\x24",
          pp.V2_SIGNATURE + b"\x20\x00"]
SPECIAL = b"\x00\r\n :.0123456789abcdefPROXY\xff!\x11\x20"


def random_ip(rng: random.Random, six: bool) -> str:
    raw = bytes(rng.getrandbits(8) for _ in range(16 if six else 4))
    if six and rng.random() < 0.3:
        raw = b"\0" * 10 + b"\xff\xff" + raw[:4]  # mapped: inet_ntop writes a dotted tail
    return pp.socket.inet_ntop(pp.socket.AF_INET6 if six else pp.socket.AF_INET, raw)


def valid_header(rng: random.Random):
    """(bytes, expected client or None, kind)."""
    kind = rng.choice(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-tcp4", "v2-tcp6", "v2-unix",
                       "v2-unspec", "v2-local"])
    six = kind.endswith("6")
    src = (random_ip(rng, six), rng.randrange(65536))
    dst = (random_ip(rng, six), rng.randrange(65536))
    tlvs = [(rng.randrange(256), rng.randbytes(rng.choice([0, 1, 4, 30])))
            for _ in range(rng.choice([0, 0, 1, 3]))]
    if kind == "v1-unknown":
        return pp.encode_v1(None, None), None, kind
    if kind.startswith("v1"):
        return pp.encode_v1(src, dst), src, kind
    if kind == "v2-unix":
        return pp.encode_v2(rng.randbytes(rng.randrange(109)), "/run/x", tlvs), None, kind
    if kind == "v2-unspec":
        return pp.encode_v2(None, None, tlvs), None, kind
    if kind == "v2-local":
        return pp.encode_v2_local(tlvs), None, kind
    return pp.encode_v2(src, dst, tlvs), src, kind


def mutate(rng: random.Random, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[at] = rng.choice(SPECIAL)
        elif op == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 3))
        elif op == 3 and buf:
            del buf[at]
        elif op == 4:
            del buf[at:]
    return bytes(buf)


def check(buffer: bytes, mode: str):
    """Parse every prefix; return (final answer, problem or None)."""
    final = None
    decided_at = None
    for cut in range(len(buffer) + 1):
        try:
            answer = pp.parse(buffer[:cut], mode)
        except pp.ProxyHeaderError as error:
            if error.reason not in pp.REASONS:
                return None, f"unknown reason {error.reason!r}"
            answer = ("reject", error.reason)
        except Exception as error:  # the property under test: nothing else escapes
            return None, f"prefix {cut}: {type(error).__name__}: {error}"
        if final is None:
            if isinstance(answer, pp.NeedMore):
                if answer.at_least < 1:
                    return None, f"prefix {cut}: {answer!r}"
                continue
            final, decided_at = answer, cut
        elif answer != final:
            return None, f"prefix {cut}: {answer!r} after {final!r} at {decided_at}"
    if isinstance(final, pp.ProxyHeader):
        if final.length != decided_at or final.length > len(buffer):
            return None, f"length {final.length}, decided at {decided_at}"
        if final.version == 2 and final.length != 16 + struct.unpack_from("!H", buffer, 14)[0]:
            return None, "v2 length is not 16 + len"
        if final.version == 1 and (final.length > pp.V1_MAX_LENGTH
                                   or buffer.find(b"\r\n") != final.length - 2):
            return None, "v1 length is not its first CRLF within 107 bytes"
    return final, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    kinds = collections.Counter()
    outcomes = collections.Counter()
    failures = []
    prefixes = 0
    started = time.monotonic()
    for case in range(args.cases):
        raw, client, kind = valid_header(rng)
        tail = rng.randbytes(rng.randrange(8))
        shape = rng.choices(["valid", "mutated", "start+random", "random"], [2, 5, 2, 1])[0]
        if shape == "valid":
            buffer = raw + tail
        elif shape == "mutated":
            buffer = mutate(rng, raw + tail)
        elif shape == "start+random":
            buffer = rng.choice(STARTS) + rng.randbytes(rng.randrange(120))
        else:
            buffer = rng.randbytes(rng.randrange(120))
        mode = "any" if shape == "valid" else rng.choice(["any", "any", "v1", "v2"])
        kinds[shape] += 1
        prefixes += len(buffer) + 1
        final, problem = check(buffer, mode)
        if problem is None and shape == "valid":
            if not isinstance(final, pp.ProxyHeader) or final.length != len(raw) \
                    or final.client != client:
                problem = f"round trip of {kind}: {final!r}"
        if problem is not None:
            failures.append((case, buffer, mode, problem))
            outcomes["FAILED"] += 1
            continue
        if isinstance(final, pp.ProxyHeader):
            outcomes[f"header v{final.version} {final.command} {final.family}"] += 1
        elif final is None:
            outcomes["need more (undecided)"] += 1
        else:
            outcomes[f"rejected {final[1]}"] += 1
    elapsed = time.monotonic() - started
    print(f"cases {args.cases} (seed {args.seed}), prefixes parsed {prefixes}, "
          f"{elapsed:.1f} s ({elapsed / prefixes * 1e6:.2f} us per parse)")
    print("buffers:", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for name, count in sorted(outcomes.items()):
        print(f"  {count:7d}  {name}")
    print(f"failures {len(failures)}")
    for case, buffer, mode, problem in failures[:5]:
        print(f"  case {case} mode {mode}: {problem}\n    {buffer!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
