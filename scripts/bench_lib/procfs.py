"""Reading CPU time and memory (PSS) of a process tree from /proc.

* CPU: ``/proc/PID/stat`` fields 14-17 (utime, stime, cutime, cstime) in clock
  ticks. Summing utime+stime of every live process in the tree plus
  cutime+cstime of every live process counts each exited-and-reaped
  descendant exactly once (in its reaper's cutime/cstime) - which matters for
  socat, whose per-connection children exit after every connection.
* Memory: ``Pss`` from ``/proc/PID/smaps_rollup``. PSS splits shared pages
  between the processes that map them, so summing it over a forking proxy's
  processes neither ignores nor double-counts shared memory.
* Tree: ``/proc/PID/task/*/children`` when the kernel has it
  (CONFIG_PROC_CHILDREN); otherwise a scan of every ``/proc/*/stat`` ppid.
"""
from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces or parens: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def _children_from_task_files(pid: int) -> list[int] | None:
    kids: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            kids.extend(int(x) for x in (task / "children").read_text().split())
        except FileNotFoundError:
            return None  # kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return kids


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    if _children_from_task_files(root) is None:
        by_parent = _ppid_map()
        lookup = lambda pid: by_parent.get(pid, [])  # noqa: E731
    else:
        lookup = lambda pid: _children_from_task_files(pid) or []  # noqa: E731
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if (PROC / str(pid)).exists():
            pids.append(pid)
            todo.extend(lookup(pid))
    return pids


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    members = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def tree_cpu_seconds(root: int) -> float:
    """utime+stime(+cutime+cstime) of the live tree, in seconds."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            # stat fields 14..17 are at indexes 11..14 once field 3 is index 0.
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def pss_kib(pid: int) -> int:
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_kib(root: int) -> tuple[int, int]:
    """(summed PSS in KiB, number of processes) of the live tree."""
    pids = tree_pids(root)
    return sum(pss_kib(pid) for pid in pids), len(pids)


def tree_pss_by_process(root: int) -> dict[str, int]:
    """PSS in KiB of each live process of the tree, keyed ``PID title`` (its cmdline,
    which prefork-proxy sets to ``prefork-proxy: worker N gen G`` and the like)."""
    shown = {}
    for pid in tree_pids(root):
        try:
            title = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()[:60]
        except OSError:
            continue
        shown[f"{pid} {title}"] = pss_kib(pid)
    return shown


def system_busy_seconds() -> float:
    """CPU time spent in user+nice+system+irq+softirq on all CPUs since boot.

    irq/softirq count: loopback traffic is largely processed in softirq, which
    /proc/stat books apart but the kernel also charges to the process it
    interrupted (on this machine an iperf3 run's own CPU matched
    user+nice+system+softirq, not user+nice+system).
    """
    fields = (PROC / "stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


class ForeignCpu:
    """CPU used by processes that are not this benchmark or its descendants.

    Everything the benchmark runs (clients, backends, proxies) descends from
    this process, and the CPU of reaped children is in our cutime/cstime, so
    system busy time minus our tree's time is other load on the machine - a
    concurrent test suite, say - which would skew every figure.
    """

    def __init__(self) -> None:
        self.start_busy = system_busy_seconds()
        self.start_own = tree_cpu_seconds(os.getpid())

    def seconds(self) -> float:
        busy = system_busy_seconds() - self.start_busy
        own = tree_cpu_seconds(os.getpid()) - self.start_own
        return max(0.0, busy - own)


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT (state 06) in /proc/net/tcp and tcp6."""
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(PROC / "net" / name) as f:
                next(f, None)
                count += sum(1 for line in f if line.split(None, 4)[3] == "06")
        except OSError:
            pass
    return count


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of one process (not its children), in seconds; 0.0 if gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0
