"""Turning samples into medians, ratios, a Markdown table, JSON and a PNG chart."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    short: str  # x-axis label in the chart
    unit: str
    higher_is_better: bool
    has_direct: bool = True  # False: nothing to measure when no proxy sits in between


METRICS = [
    Metric("bulk_p1_fwd_gbps", "Bulk, 1 stream, client→server", "bulk\n1 stream →", "Gbit/s", True),
    Metric("bulk_p1_rev_gbps", "Bulk, 1 stream, server→client (-R)", "bulk\n1 stream ←", "Gbit/s",
           True),
    Metric("bulk_p8_fwd_gbps", "Bulk, 8 streams, client→server", "bulk\n8 streams →", "Gbit/s",
           True),
    Metric("bulk_p8_rev_gbps", "Bulk, 8 streams, server→client (-R)", "bulk\n8 streams ←",
           "Gbit/s", True),
    Metric("cpu_s_per_gb", "Proxy CPU per GB relayed (all bulk runs)", "CPU/GB", "CPU-s/GB",
           False, False),
    Metric("keepalive_rps", "Keep-alive PING, 50 conns", "keep-alive\nreq/s", "req/s", True),
    Metric("keepalive_p50_ms", "Keep-alive PING p50 latency", "keep-alive\np50", "ms", False),
    Metric("keepalive_p99_ms", "Keep-alive PING p99 latency", "keep-alive\np99", "ms", False),
    Metric("newconn_cps", "New connection per PING (-k 0)", "new conn\nconn/s", "conn/s", True),
    Metric("newconn_p99_ms", "New connection per PING p99 latency", "new conn\np99", "ms", False),
    Metric("idle_kib_per_conn", "Idle connections: proxy PSS per conn", "PSS/conn", "KiB/conn",
           False, False),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}

#: prefork-proxy's own growth figures (bench_lib/growth.py): no peer has an equivalent.
GROWTH_METRICS = [
    Metric("growth_keepalive_rps_base", "Kept-alive PING, 50 conns, no idle connections held",
           "", "req/s", True, False),
    Metric("growth_keepalive_rps_idle", "Kept-alive PING, 50 conns, N idle connections held",
           "", "req/s", True, False),
    Metric("growth_keepalive_idle_ratio", "Kept-alive req/s with / without the idle "
           "connections (goal ≥ 0.95)", "", "×", True, False),
    Metric("growth_keepalive_p99_idle_ratio", "Kept-alive p99 with / without the idle "
           "connections", "", "×", False, False),
    Metric("growth_newconn_cps_2", "New connection per PING, 2 backends", "", "conn/s", True,
           False),
    Metric("growth_newconn_cps_1000", "New connection per PING, 1,000 backends (weights 1-10)",
           "", "conn/s", True, False),
    Metric("growth_newconn_1000_ratio", "New conn/s 1,000 / 2 backends (goal ≥ 0.9)", "", "×",
           True, False),
    Metric("growth_reload_s", "Reload with N open: SIGHUP → every new worker booted (goal < 1)",
           "", "s", False, False),
    Metric("growth_master_cpu_share", "Master CPU during the drain window", "", "CPUs", False,
           False),
]


def medians(samples: list[dict], peers: list[str]) -> dict[str, dict[str, tuple[float, int]]]:
    """{metric: {peer: (median, n)}} over every sample that has a value."""
    values: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        if sample.get("value") is not None:
            values.setdefault(sample["metric"], {}).setdefault(sample["peer"], []).append(
                sample["value"])
    return {metric: {peer: (statistics.median(vals), len(vals))
                     for peer, vals in per_peer.items() if peer in peers}
            for metric, per_peer in values.items()}


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(meds: dict, peers: list[str], unavailable: dict[str, str], header: dict,
             samples: list[dict] | None = None) -> str:
    lines = [f"# prefork-proxy side-by-side benchmark — {header['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "date"]
    lines += ["", "Medians over repeats; ratios are against `direct` and against HAProxy "
              "from the same run (×1.00 = equal). ↑ higher is better, ↓ lower is better.", ""]
    lines += summary_table(meds, peers) + [""]
    lines += ratio_table(meds, peers) + [""]
    growth = growth_table(samples or [])
    if growth:
        lines += ["Growth workloads (prefork-proxy only: no peer has an equivalent; ratios "
                  "are of prefork-proxy to itself, per repeat):", ""] + growth + [""]
    if unavailable:
        lines += ["Unavailable peers:", ""]
        lines += [f"- `{peer}`: {why}" for peer, why in unavailable.items()] + [""]
    return "\n".join(lines)


def summary_table(meds: dict, peers: list[str]) -> list[str]:
    lines = ["| Metric | Unit | " + " | ".join(peers) + " |",
             "|---|---|" + "---:|" * len(peers)]
    for m in METRICS:
        cells = [_fmt(meds.get(m.key, {}).get(p, (None, 0))[0]) for p in peers]
        arrow = "↑" if m.higher_is_better else "↓"
        lines.append(f"| {m.label} {arrow} | {m.unit} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(meds: dict, peers: list[str]) -> list[str]:
    lines = ["| Metric | Peer | Median | vs direct | vs HAProxy | n |",
             "|---|---|---:|---:|---:|---:|"]
    for m in METRICS:
        per_peer = meds.get(m.key, {})
        direct = per_peer.get("direct", (None, 0))[0]
        haproxy = per_peer.get("haproxy", (None, 0))[0]
        for p in peers:
            value, n = per_peer.get(p, (None, 0))
            if p == "direct" and not m.has_direct:
                continue
            lines.append(f"| {m.label} ({m.unit}) | {p} | {_fmt(value)} | "
                         f"{_fmt_ratio(ratio(value, direct))} | "
                         f"{_fmt_ratio(ratio(value, haproxy))} | {n} |")
    return lines


def growth_table(samples: list[dict]) -> list[str]:
    """Median, min–max and count of each growth figure (no table if none was measured)."""
    values: dict[str, list[float]] = {}
    for sample in samples:
        if sample["metric"].startswith("growth_") and sample.get("value") is not None:
            values.setdefault(sample["metric"], []).append(sample["value"])
    if not values:
        return []
    lines = ["| Metric | Unit | Median | min–max | n |", "|---|---|---:|---:|---:|"]
    for m in GROWTH_METRICS:
        vals = values.get(m.key)
        if not vals:
            lines.append(f"| {m.label} | {m.unit} | — | — | 0 |")
            continue
        arrow = "↑" if m.higher_is_better else "↓"
        lines.append(f"| {m.label} {arrow} | {m.unit} | {_fmt(statistics.median(vals))} | "
                     f"{_fmt(min(vals))}–{_fmt(max(vals))} | {len(vals)} |")
    return lines


def write_json(path: Path, header: dict, samples: list[dict], runs: list[dict], meds: dict,
               unavailable: dict[str, str]) -> None:
    doc = {"header": header, "unavailable": unavailable,
           "medians": {metric: {peer: {"median": v, "n": n} for peer, (v, n) in per.items()}
                       for metric, per in meds.items()},
           "samples": samples,  # one metric value per (repeat, peer, metric)
           "runs": runs}        # raw result of every workload run, errors included
    path.write_text(json.dumps(doc, indent=1, default=str))


def write_chart(path: Path, meds: dict, peers: list[str], title: str) -> bool:
    """Bars of each peer's median / direct's median: one panel for the figures
    where higher is better, one for latencies. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [m for m in METRICS if m.has_direct and "direct" in meds.get(m.key, {})]
    shown = [p for p in peers if p != "direct"]
    panels = [[m for m in metrics if m.higher_is_better],
              [m for m in metrics if not m.higher_is_better]]
    panels = [panel for panel in panels if panel]
    if not panels or not shown:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 6), squeeze=False,
                             gridspec_kw={"width_ratios": [len(p) for p in panels]})
    for ax, panel in zip(axes[0], panels):
        _bar_panel(ax, meds, panel, shown)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(shown))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar_panel(ax, meds: dict, metrics: list[Metric], peers: list[str]) -> None:
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        ys = [ratio(meds[m.key].get(peer, (None, 0))[0], meds[m.key]["direct"][0]) or 0
              for m in metrics]
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(metrics))]
        bars = ax.bar(xs, ys, width, label=peer)
        ax.bar_label(bars, labels=[f"{y:.2f}" if y else "" for y in ys], fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)  # direct = 1.0
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.short for m in metrics], fontsize=8)
    better = "higher" if metrics[0].higher_is_better else "lower"
    ax.set_ylabel(f"median / direct median ({better} is better)")
