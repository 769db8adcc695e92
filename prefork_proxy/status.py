"""The status model: one dict that says how the proxy is, built once, shown everywhere.

Who calls what:

- ``build`` runs in the master (its loop, about once a second): it reads the
  master's own tables (generation, workers, listeners, last reload) and the
  shared memory (worker rows, backend table) and returns a plain,
  JSON-ready dict.  The master writes it to the status file beside the pidfile
  and publishes it to the admin process (``admin.page``), so
  ``prefork-proxy status`` and ``GET /status`` show the same content.
- ``render_text`` and ``problems`` run wherever the dict is read (the
  ``prefork-proxy status`` command): the text view and the health verdict.
- ``backend_rows`` is the backend part of the model (also for tests).

The dict (``SCHEMA_VERSION`` 1)::

    {"pid", "uptime_s", "generation", "desired_workers", "relay", "listeners": [str],
     "stopping": bool, "written_at": wall-clock seconds,
     "workers": [{"slot", "generation", "pid", "age_s", "active", "accepted",
                  "heartbeat_age_s", "state": "booting" | "serving" | "draining"}],
     "backends": [{"listener", "backend", "state": "up" | "down" | "unresolved",
                   "down_reason": "checks" | "failures" | "", "down_left_s",
                   "backup", "active", "fails", "last_check_at", "last_check_ok",
                   "admin": "ready" | "drain" | "disabled" (``prefork-proxy backend``)}],
     "counters": SharedState.counters() (per listener and backend, for /metrics),
     "worker_restarts": {reason: n}, "reloads": {result: n} (the master's life),
     "reloading": bool (a new generation is booting),
     "last_reload": {"ok", "generation", "error", "at"} | None,
     "version": the running code's __version__,
     "upgrade": {"state": "starting" | "ready" | "failed", "new_pid", "version",
                 "error", "started_at", "at"} | None (the last SIGUSR2 upgrade)}

This module imports no process code (not ``master``): ``build`` reads a
master-like object by its attributes.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from prefork_proxy.balancer import backend_name
from prefork_proxy.listeners import bound_address
from prefork_proxy.shared import ADMIN_STATE_NAMES, SharedState

SCHEMA_VERSION = 1
#: A status older than this means the master loop is not turning.
STALE_AFTER_S = 5.0
WORKER_STATES = ("booting", "serving", "draining")


def build(master: Any, now: float) -> Dict[str, Any]:
    """The model of ``master`` at monotonic time ``now`` (master process, its loop)."""
    board = master.board
    workers = [{"slot": w.slot, "generation": w.generation, "pid": w.pid,
                "age_s": now - w.started, "active": board.active[w.row],
                "accepted": board.accepted(w.row),
                "heartbeat_age_s": now - board.heartbeat[w.row],
                "state": "draining" if w.retiring or master.stopping
                else "serving" if board.booted[w.row] else "booting"}
               for w in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot))]
    return {"schema": SCHEMA_VERSION, "pid": master.pid, "uptime_s": now - master.started,
            "generation": master.generation, "desired_workers": master.desired,
            "relay": master.mode, "listeners": [bound_address(s) for s in master.sockets],
            "stopping": bool(master.stopping), "workers": workers,
            "backends": backend_rows(master.shared) if master.shared else [],
            "counters": master.shared.counters() if master.shared else {},
            "worker_restarts": dict(master.worker_restarts), "reloads": dict(master.reloads),
            "reloading": master.pending is not None, "last_reload": master.last_reload,
            "version": getattr(master, "version", ""),
            "upgrade": getattr(master, "upgrade_status", None),
            "written_at": time.time()}


def backend_rows(shared: SharedState) -> List[Dict[str, Any]]:
    """One row per backend address (a hostname not resolved yet: one row for the name),
    of every pool: ``route`` is "" for a listener's own, the route's name for an SNI
    route's."""
    table = shared.table
    now = time.monotonic()
    rows: List[Dict[str, Any]] = []
    for _, listener, entries in shared.pools():
        for entry in entries:
            slots = [s for s in entry.slots if table.family[s]]
            if not slots:
                first = entry.slots[0]
                rows.append({"listener": listener.label, "route": listener.route_name,
                             "backend": str(entry.backend.address),
                             "state": "unresolved", "down_reason": "", "down_left_s": None,
                             "backup": entry.backend.backup,
                             "active": shared.rows.active_count(first), "fails": table.fails[first],
                             "last_check_at": None, "last_check_ok": None,
                             "admin": ADMIN_STATE_NAMES.get(table.admin_state[first], "?")})
            for slot in slots:
                address = table.address(slot)
                state, reason, left = "up", "", None
                if table.active_down[slot]:
                    state, reason = "down", "checks"
                elif table.down_until[slot] > now:
                    state, reason = "down", "failures"
                    left = table.down_until[slot] - now
                checked = table.last_check[slot]
                rows.append({
                    "listener": listener.label, "route": listener.route_name,
                    "backend": backend_name(entry.backend, address[1] if address else None,
                                            entry.literal),
                    "state": state, "down_reason": reason, "down_left_s": left,
                    "backup": entry.backend.backup, "active": shared.rows.active_count(slot),
                    "fails": table.fails[slot], "last_check_at": checked or None,
                    "last_check_ok": bool(table.last_check_ok[slot]) if checked else None,
                    "admin": ADMIN_STATE_NAMES.get(table.admin_state[slot], "?")})
    return rows


def with_age(status: Dict[str, Any]) -> Dict[str, Any]:
    """``status`` plus ``stale_s``: how long ago the master wrote it (any reader)."""
    status = dict(status)
    status["stale_s"] = max(0.0, time.time() - status.get("written_at", 0.0))
    return status


def problems(status: Dict[str, Any]) -> List[str]:
    """Why this master is not healthy, if it is not (``status`` then exits 1)."""
    found = []
    if status.get("stale_s", 0.0) > STALE_AFTER_S:
        found.append(f"the status file was written {status['stale_s']:.0f} s ago: "
                     "the master loop is stuck")
    if not any(w["state"] == "serving" for w in status.get("workers", [])):
        found.append("no worker is serving")
    return found


def render_text(status: Dict[str, Any]) -> str:
    """The text ``prefork-proxy status`` prints."""
    version = f"  version {status['version']}" if status.get("version") else ""
    lines = [f"master pid {status['pid']}{version}  uptime {_duration(status['uptime_s'])}  "
             f"generation {status['generation']}  workers {len(status['workers'])}/"
             f"{status['desired_workers']}  relay {status['relay']}"
             + ("  STOPPING" if status.get("stopping") else ""),
             f"listeners {', '.join(status['listeners'])}"]
    lines.append(f"{'slot':>4} {'gen':>4} {'pid':>8} {'age':>9} {'open':>6} {'accepted':>9} "
                 f"state")
    for worker in status["workers"]:
        lines.append(f"{worker['slot']:>4} {worker['generation']:>4} {worker['pid']:>8} "
                     f"{_duration(worker['age_s']):>9} {worker['active']:>6} "
                     f"{worker['accepted']:>9} {worker['state']}")
    lines.extend(backend_lines(status.get("backends", [])))
    lines.extend(_reload_lines(status))
    upgrade = status.get("upgrade")
    if upgrade:
        ago = _duration(max(0.0, time.time() - upgrade.get("at", 0.0)))
        lines.append(f"last upgrade: {upgrade.get('state')} {ago} ago, new master "
                     f"{upgrade.get('new_pid')}"
                     + (f" (version {upgrade['version']})" if upgrade.get("version") else "")
                     + (f": {upgrade['error']}" if upgrade.get("error") else ""))
    lines.extend(f"UNHEALTHY: {problem}" for problem in problems(status))
    return "\n".join(lines)


def backend_lines(rows: List[Dict[str, Any]], wall: Optional[float] = None) -> List[str]:
    """The backend table as text: listener, backend, state, active, fails, last check."""
    if not rows:
        return []
    wall = time.time() if wall is None else wall
    lines = [f"{'listener':<22} {'backend':<34} {'state':<26} {'active':>6} {'fails':>5}  "
             "last check"]
    for row in rows:
        if row["state"] == "unresolved":
            state = "not resolved yet"
        elif row["state"] == "down" and row["down_reason"] == "failures":
            state = f"down (failures, {row['down_left_s'] or 0:.0f} s left)"
        elif row["state"] == "down":
            state = f"down ({row['down_reason']})"
        else:
            state = row["state"]
        if row["backup"] and row["state"] != "unresolved":
            state += ", backup"
        if row.get("admin", "ready") != "ready":  # the operator took it out of rotation
            state += f", {row['admin']}"
        checked = "-"
        if row["last_check_at"]:
            result = "ok" if row["last_check_ok"] else "failed"
            checked = f"{max(0.0, wall - row['last_check_at']):.1f} s ago, {result}"
        pool = row["listener"] + (f" route {row['route']}" if row.get("route") else "")
        lines.append(f"{pool:<22} {row['backend']:<34} {state:<26} "
                     f"{row['active']:>6} {row['fails']:>5}  {checked}")
    return lines


def _reload_lines(status: Dict[str, Any]) -> List[str]:
    """What ``status`` says about the reload in progress or the last one."""
    lines = []
    if status.get("reloading"):
        lines.append(f"reload in progress: generation {status['generation']} is booting")
    last = status.get("last_reload")
    if last:
        ago = _duration(max(0.0, time.time() - last.get("at", 0.0)))
        if last.get("ok"):
            lines.append(f"last reload: ok, {ago} ago (generation {last.get('generation')})")
        else:
            lines.append(f"last reload: FAILED {ago} ago, still serving generation "
                         f"{status['generation']} with the old config: {last.get('error')}")
    return lines


def _duration(seconds: Optional[float]) -> str:
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
