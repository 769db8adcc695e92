"""Counts the bytecode instructions a prefork-proxy worker's relay threads execute.

Loaded by Python at start-up (``site`` imports ``sitecustomize``) when
``scripts/relay_opcodes.py`` puts this directory on ``PYTHONPATH`` and sets
``PREFORK_OPCODE_TRACE`` to an output prefix; without that variable it does
nothing.  Every thread whose name starts with ``relay-`` runs under a
``sys.settrace`` hook with ``f_trace_opcodes``: one count per instruction,
by function (``co_qualname`` and file), and one per call of the relay's
``_close`` (once per connection).  A thread of its own writes them to
``<prefix>-<pid>-<thread>.json`` every ``DUMP_INTERVAL_S``, with the
``time.monotonic()`` of the copy (a system-wide clock: the reader waits for a
copy taken after its load ended): the worker ends with ``os._exit``, so
nothing can be written at exit.

Test-and-benchmark tooling only: the relay runs some 50 times slower
under it, so every time-dependent loop (histogram buckets, timers) is
skewed; counts of the per-connection path are exact.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import threading
import time

DUMP_INTERVAL_S = 0.25


def _install(prefix: str) -> None:
    original_run = threading.Thread.run

    def run(self: threading.Thread) -> None:
        if not self.name.startswith("relay-"):
            original_run(self)
            return
        counts: "collections.Counter[str]" = collections.Counter()
        closes = [0]
        path = f"{prefix}-{os.getpid()}-{self.name}.json"

        def dump_forever() -> None:
            while True:
                time.sleep(DUMP_INTERVAL_S)
                at = time.monotonic()
                # One C-level copy under the interpreter lock: a consistent snapshot.
                snapshot, closed = dict(counts), closes[0]
                with open(path + ".tmp", "w") as out:
                    json.dump({"at": at, "closes": closed, "opcodes": sum(snapshot.values()),
                               "by_function": snapshot}, out)
                os.replace(path + ".tmp", path)

        # Not a relay- thread: it is not traced itself.
        threading.Thread(target=dump_forever, name="opcode-dump", daemon=True).start()

        def on_opcode(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "opcode":
                code = frame.f_code
                name = getattr(code, "co_qualname", code.co_name)  # 3.11+: Class.method
                counts[f"{name} ({os.path.basename(code.co_filename)})"] += 1
            return on_opcode

        def on_call(frame, event, arg):  # type: ignore[no-untyped-def]
            if event != "call":
                return None
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            code = frame.f_code
            if code.co_name == "_close" and code.co_filename.endswith(
                    os.path.join("relay", "loop.py")):
                closes[0] += 1
            return on_opcode

        sys.settrace(on_call)
        original_run(self)

    threading.Thread.run = run  # type: ignore[method-assign]


if os.environ.get("PREFORK_OPCODE_TRACE"):
    _install(os.environ["PREFORK_OPCODE_TRACE"])
