"""Print how fast this Python interpreter runs a relay-like loop, in microseconds.

Who runs it: ``scripts/bootstrap``, under each candidate interpreter, before it
creates ``.venv`` (it picks the fastest; see there).  It exits 1, printing
nothing, when this interpreter cannot make the venv at all (older than the
project's 3.9, or without ``venv``/``ensurepip``: Debian ships those as the
separate ``python3-venv`` package).

Why measure instead of reading build flags: about half of a worker's CPU per
connection is interpreted Python, and builds of the same version differ by up
to 2x in that kind of work.  Debian's and the official Docker image's
interpreters are built with profile-guided and link-time optimization and
link libpython statically; a version manager's build (pyenv compiles without
``--enable-optimizations`` unless told, and with ``--enable-shared``) ran this
loop 1.4-2x slower on the development VM, and prefork-proxy's workers spent
about 12% more user CPU per new connection on it (README, Performance).  No one build flag tells those apart across distributions; the
loop does.  The figure is the best of several short runs (about 0.1 s in all),
so a busy machine slows every candidate alike rather than picking at random.
"""

from __future__ import annotations

import sys
import time


class _Peer:
    """An object with the attribute traffic of a relay direction."""

    __slots__ = ("moved", "state")

    def __init__(self) -> None:
        self.moved = 0
        self.state = "open"

    def pump(self, chunk: bytes) -> int:
        self.moved += len(chunk)
        return self.moved


def _loop(rounds: int = 20000) -> int:
    peers = [_Peer() for _ in range(64)]
    table: dict = {}
    chunk = b"x" * 64
    total = 0
    for index in range(rounds):
        peer = peers[index & 63]
        total += peer.pump(chunk)
        table[index & 255] = peer.state
        if len(table) > 200:
            total += 1
    return total


def main() -> int:
    if sys.version_info < (3, 9):
        return 1
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return 1
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        _loop()
        best = min(best, time.perf_counter() - started)
    print(round(best * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
