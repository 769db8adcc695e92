"""Config variants of one listener: parsing ``--variant`` specs, merging, TOML, the table.

Who uses it: ``scripts/ab_bench.py variants`` (the runner is
``bench_lib/variant_run.py``), in the benchmark's own process; everything here
is pure (no processes, no sockets) so the smoke test checks it on fixed input.

A variant is ``NAME=`` (the base config as it is), ``NAME=KEY=VALUE,KEY=VALUE``
or ``NAME=@FILE.toml`` (a TOML fragment). KEY is dotted: ``server.X`` and
``admin.X`` go to those sections, ``tcp_proxy.X`` (or ``listener.X``) to the
one listener under test. VALUE is read as a TOML value when it parses as one
(``v2`` does not, so it is the string "v2"; ``["127.0.0.0/8"]``, ``50``,
``true`` and inline tables do), else it is taken as a string. Commas inside
brackets, braces or quotes do not split; ``!unset`` removes the key. Before
the merge, the whole words ``PORT`` (a free loopback port of this instance:
one per instance, the same for every use), ``BACKEND`` (``127.0.0.1:P`` of
the listener's backend) and ``RUNDIR`` (the instance's own directory) are
replaced in every string.
"""
from __future__ import annotations

import copy
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11 (the scripts need 3.11; ruff's target is 3.9)
    import tomli as tomllib

SECTION_ALIASES = {"server": "server", "admin": "admin", "tcp_proxy": "tcp_proxy",
                   "listener": "tcp_proxy"}
#: A VALUE that removes the key from the generated config (e.g. a listener's own
#: ``backends``, so that only its SNI routes can serve).
UNSET = "!unset"
TOKENS = re.compile(r"\b(PORT|BACKEND|RUNDIR)\b")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
#: Each chain HAProxy: 2 fds per connection + its own must fit the 20,000 open-file limit.
CHAIN_MAXCONN = 9500


class VariantError(ValueError):
    """A ``--variant`` spec that cannot be read."""


@dataclass(frozen=True)
class Variant:
    name: str
    spec: str                                          # as typed, for the report header
    fragment: dict[str, Any] = field(default_factory=dict)  # {"server": {...}, "admin": {...},
    #                                                         "tcp_proxy": {...}}

    def uses(self, section: str, key: str) -> Any:
        """The fragment's value of ``section.key`` (None when the variant does not set it)."""
        return self.fragment.get(section, {}).get(key)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str) -> Any:
    """A TOML value if ``text`` is one, else ``text`` itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_variant(spec: str) -> Variant:
    """``NAME=...`` -> Variant (see the module docstring)."""
    name, eq, rest = spec.partition("=")
    name = name.strip()
    if not eq or not NAME.match(name):
        raise VariantError(f"--variant {spec!r}: expected NAME=[KEY=VALUE,...] or NAME=@FILE "
                           "(NAME: letters, digits, _.-)")
    rest = rest.strip()
    if rest.startswith("@"):
        try:
            document = tomllib.loads(Path(rest[1:]).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise VariantError(f"--variant {name}: {rest[1:]}: {exc}") from None
        fragment: dict[str, Any] = {}
        for section, table in document.items():
            if section not in SECTION_ALIASES or not isinstance(table, dict):
                raise VariantError(f"--variant {name}: {rest[1:]}: top-level [{section}]: "
                                   f"only {sorted(SECTION_ALIASES)} tables")
            fragment.setdefault(SECTION_ALIASES[section], {}).update(table)
        return Variant(name, spec, fragment)
    fragment = {}
    for item in split_top_level(rest):
        key, eq, value = item.partition("=")
        section, dot, subkey = key.strip().partition(".")
        if not eq or not dot or section not in SECTION_ALIASES or not subkey:
            raise VariantError(f"--variant {name}: {item!r}: expected SECTION.KEY=VALUE with "
                               f"SECTION one of {sorted(SECTION_ALIASES)}")
        fragment.setdefault(SECTION_ALIASES[section], {})[subkey] = parse_value(value.strip())
    return Variant(name, spec, fragment)


def substitute(value: Any, tokens: dict[str, str]) -> Any:
    """``value`` with PORT / BACKEND / RUNDIR replaced in every string, recursively."""
    if isinstance(value, str):
        return TOKENS.sub(lambda m: tokens.get(m.group(1), m.group(1)), value)
    if isinstance(value, list):
        return [substitute(v, tokens) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, tokens) for k, v in value.items()}
    return value


def base_document(bind_port: int, backend_port: int, workers: int) -> dict[str, Any]:
    """The config every variant starts from: one listener, one backend, ``workers``."""
    return {"server": {"workers": workers},
            "tcp_proxy": [{"bind": f"127.0.0.1:{bind_port}",
                           "backends": [f"127.0.0.1:{backend_port}"]}]}


def merged(base: dict[str, Any], variant: Variant, tokens: dict[str, str]) -> dict[str, Any]:
    """``base`` with the variant's fragment merged in (its listener keys into the listener)."""
    doc = copy.deepcopy(base)
    for section, table in substitute(variant.fragment, tokens).items():
        target = doc["tcp_proxy"][0] if section == "tcp_proxy" else doc.setdefault(section, {})
        _deep_update(target, table)
    return doc


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if value == UNSET:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def to_toml(doc: dict[str, Any]) -> str:
    """Serialize a config document: tables as ``[name]``, lists of tables as
    ``[[name]]``, everything nested inline (enough for prefork-proxy's configs)."""
    lines: list[str] = []
    for name, value in doc.items():
        if isinstance(value, dict):
            lines += [f"[{_key(name)}]"] + [f"{_key(k)} = {_inline(v)}" for k, v in value.items()]
            lines.append("")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                lines += [f"[[{_key(name)}]]"]
                lines += [f"{_key(k)} = {_inline(v)}" for k, v in table.items()]
                lines.append("")
        else:
            raise ValueError(f"top-level {name!r} must be a table or a list of tables")
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if BARE_KEY.match(key) else json.dumps(key)


def _inline(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} as TOML")


def rotated(items: list[str], round_no: int) -> list[str]:
    """Round 1: a, b, c; round 2: b, c, a; ... (drift falls on every variant in turn)."""
    k = (round_no - 1) % len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------------------- chain peers

def haproxy_chain_configs(front_port: int, prefork_port: int, back_port: int,
                          backend_port: int, send_proxy: str | None,
                          accept_proxy: bool) -> tuple[str, str]:
    """Two HAProxy configs around prefork-proxy (issue 12's cost run): ``front``
    (clients -> prefork, with ``send-proxy[-v2]`` when the variant wants a header)
    and ``back`` (prefork -> the backend, its bind with ``accept-proxy`` when the
    variant sends one). The same processes and tuning for every variant. Two
    processes of one thread each, not one of two threads: one process would need
    4 fds per held connection and the idle workload's 5,000 would pass the
    20,000 open-file limit (HAProxy refuses to start when maxconn cannot fit)."""
    server_opt = {None: "", "v1": " send-proxy", "v2": " send-proxy-v2"}[send_proxy]
    common = f"""\
global
    nbthread 1
    maxconn {CHAIN_MAXCONN}

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
"""
    front = common + f"""
frontend front
    bind 127.0.0.1:{front_port}
    default_backend to_prefork

backend to_prefork
    server prefork 127.0.0.1:{prefork_port}{server_opt}
"""
    back = common + f"""
frontend back
    bind 127.0.0.1:{back_port}{" accept-proxy" if accept_proxy else ""}
    default_backend to_backend

backend to_backend
    server backend 127.0.0.1:{backend_port}
"""
    return front, back


def chain_options(listener: dict[str, Any]) -> tuple[str | None, bool]:
    """(what the front must send, whether the back must accept a header) for a listener
    config: ``accept_proxy`` v1 -> send-proxy, v2/any -> send-proxy-v2; any
    ``send_proxy`` on the listener or a backend -> accept-proxy."""
    accept = listener.get("accept_proxy")
    front = None if not accept else "v1" if accept == "v1" else "v2"
    sends = bool(listener.get("send_proxy")) or any(
        isinstance(b, dict) and b.get("send_proxy") for b in listener.get("backends", []))
    return front, sends


# --------------------------------------------------------------------------- report

METRIC_LABELS = {
    "rps": ("req/s", "{:,.0f}", True),
    "p99_ms": ("p99 ms", "{:.3g}", False),
    "worker_cpu_us": ("workers' CPU µs/req", "{:.1f}", False),
    "tree_cpu_us": ("proxy tree CPU µs/req", "{:.1f}", False),
    "kib_per_conn": ("PSS KiB/idle conn", "{:.2f}", False),
}
WORKLOAD_ORDER = ["keepalive", "newconn", "idle"]


def summary(samples: list[dict], names: list[str]) -> list[dict]:
    """One row per (workload, metric): each variant's median/min/max/n and its ratio
    to the first variant (of the medians, and min-max of the per-round ratio)."""
    keys = sorted({(s["workload"], s["metric"]) for s in samples},
                  key=lambda k: (WORKLOAD_ORDER.index(k[0]) if k[0] in WORKLOAD_ORDER else 99,
                                 list(METRIC_LABELS).index(k[1]) if k[1] in METRIC_LABELS
                                 else 99))
    rows = []
    for workload, metric in keys:
        by_name: dict[str, dict[int, float]] = {n: {} for n in names}
        for s in samples:
            if (s["workload"], s["metric"]) == (workload, metric) and s["variant"] in by_name:
                by_name[s["variant"]][s["round"]] = s["value"]
        row: dict[str, Any] = {"workload": workload, "metric": metric, "variants": {}}
        first = by_name[names[0]]
        for name in names:
            values = list(by_name[name].values())
            stats: dict[str, Any] | None = None
            if values:
                stats = {"median": statistics.median(values), "min": min(values),
                         "max": max(values), "n": len(values)}
                reference = statistics.median(first.values()) if first else 0
                if name != names[0] and reference:  # a CPU figure under one tick can be 0
                    stats["ratio"] = stats["median"] / reference
                    paired = [v / first[r] for r, v in by_name[name].items() if first.get(r)]
                    stats["ratio_per_round"] = [min(paired), max(paired)] if paired else None
            row["variants"][name] = stats
        rows.append(row)
    return rows


def table(samples: list[dict], names: list[str], header: dict, notes: list[str],
          variants: list[Variant]) -> str:
    lines = ["# Config variants of one prefork-proxy build, side by side", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [f"- variant `{v.name}`: `{v.spec.partition('=')[2] or '(base config)'}`"
              for v in variants]
    lines += ["", f"Medians over the rounds (min–max, n). Ratio: to `{names[0]}`, of the "
              "medians; in brackets, the min–max of the same ratio round by round. CPU: "
              "utime+stime from /proc over the run ÷ requests (workers: the worker "
              "processes only; tree: master, workers, health and admin processes).", "",
              "| workload | metric | " + " | ".join(names) + " | "
              + " | ".join(f"{n}/{names[0]}" for n in names[1:]) + " |",
              "|---|---|" + "---|" * (2 * len(names) - 1)]
    for row in summary(samples, names):
        label, fmt, _ = METRIC_LABELS.get(row["metric"], (row["metric"], "{:.4g}", True))
        cells, ratios = [], []
        for name in names:
            st = row["variants"][name]
            cells.append("—" if st is None else f"{fmt.format(st['median'])} "
                         f"({fmt.format(st['min'])}–{fmt.format(st['max'])}, n={st['n']})")
            if name != names[0]:
                pr = st and st.get("ratio_per_round")
                ratios.append("—" if not st or "ratio" not in st else f"{st['ratio']:.3f}"
                              + (f" [{pr[0]:.3f}–{pr[1]:.3f}]" if pr else ""))
        lines.append(f"| {row['workload']} | {label} | " + " | ".join(cells + ratios) + " |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
