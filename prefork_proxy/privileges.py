"""Serving as an unprivileged user: the switch itself, and the runtime directory it needs.

Called by the master (``Master.run``) while it is still root: first
``prepare_runtime_dir`` for the pidfile's directory, then, once the
listeners are bound and the shared memory allocated, ``drop_privileges``.

Principle (every file written after the drop is writable by the serving
user): after the drop the master still rewrites the status file beside the
pidfile every second, and removes both at exit.  Both need a directory the
serving user may create and remove files in.  So before the drop the master
creates the pidfile's directory if it is missing (owned by that user, like
systemd's ``RuntimeDirectory=``), and checks, as that user, that it can write
there; if it cannot, the start fails with a message saying where to put the
pidfile, instead of a proxy whose ``status`` is unhealthy forever.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

from prefork_proxy.errors import ProxyError

log = logging.getLogger("prefork_proxy.master")


def _credentials(user: Optional[str], group: Optional[str]) -> Tuple[Optional[object], int]:
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (entry.pw_gid if entry else os.getgid())
    except KeyError as exc:
        raise ProxyError(f"cannot drop privileges: unknown user or group {exc}") from None
    return entry, gid


def _switch(user: Optional[str], group: Optional[str]) -> None:
    entry, gid = _credentials(user, group)
    try:
        if entry is not None:
            os.initgroups(entry.pw_name, gid)  # type: ignore[attr-defined]
        else:
            os.setgroups([gid])
        os.setgid(gid)
        if entry is not None:
            os.setuid(entry.pw_uid)  # type: ignore[attr-defined]
    except PermissionError as exc:
        raise ProxyError(f"cannot drop privileges to user={user} group={group}: "
                         f"{exc.strerror} (start as root to use user/group)") from None


def serving_ids(user: Optional[str], group: Optional[str]) -> Optional[Tuple[int, int]]:
    """(uid, gid) the master will serve as, or None without ``user``/``group``: the
    owner of the files it creates for that user before the drop (unix listeners)."""
    if not user and not group:
        return None
    entry, gid = _credentials(user, group)
    uid = entry.pw_uid if entry is not None else os.getuid()  # type: ignore[attr-defined]
    return uid, gid


def drop_privileges(user: Optional[str], group: Optional[str]) -> None:
    """Become ``user``/``group`` (supplementary groups, then gid, then uid)."""
    if not user and not group:
        return
    # Load what may be imported lazily later: after the switch, the Python
    # installation may not be readable (e.g. under /root).
    import encodings.idna  # noqa: F401  (getaddrinfo on a hostname imports it)

    entry, gid = _credentials(user, group)
    uid = entry.pw_uid if entry is not None else os.getuid()  # type: ignore[attr-defined]
    if os.geteuid() != 0 and (os.getuid(), os.getgid()) == (uid, gid):
        # Already that user: the new master of an upgrade, started by an old one
        # that dropped its privileges (it inherited the sockets; nothing to bind).
        log.info("already running as uid=%d gid=%d", uid, gid)
        return
    _switch(user, group)
    log.info("dropped privileges: uid=%d gid=%d", os.getuid(), os.getgid())


def prepare_runtime_dir(pidfile: str, user: Optional[str],
                        group: Optional[str]) -> Optional[Tuple[int, int]]:
    """Make the pidfile's directory usable by the serving user; return its (uid, gid).

    Without ``user``/``group``: nothing to do, None.  A missing directory is
    created (mode 0755) and given to the serving user; an existing one is only
    checked.  ``ProxyError`` when the serving user cannot write there.
    """
    if not user and not group:
        return None
    if os.geteuid() != 0:
        return None  # no switch will happen: drop_privileges says why, with its own message
    entry, gid = _credentials(user, group)
    uid = entry.pw_uid if entry is not None else os.getuid()  # type: ignore[attr-defined]
    directory = os.path.dirname(os.path.abspath(pidfile))
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, 0o755)
            os.chown(directory, uid, gid)
        except OSError as exc:
            raise ProxyError(f"{directory}: cannot create the runtime directory for the "
                             f"pidfile: {exc.strerror or exc}") from None
        log.info("created %s for the pidfile and status file, owned by uid=%d gid=%d",
                 directory, uid, gid)
    if not _writable_as(directory, user, group):
        who = f"user {user}" if user else f"group {group}"
        raise ProxyError(f"{directory}: {who} cannot create and remove files here, but the "
                         f"master writes the status file beside the pidfile {pidfile} and "
                         "removes both at exit after dropping privileges: put the pidfile in "
                         "a directory that user can write (a missing directory is created "
                         "for it), e.g. /run/prefork-proxy/prefork-proxy.pid")
    return uid, gid


def _writable_as(directory: str, user: Optional[str], group: Optional[str]) -> bool:
    """Try it: a child process becomes the serving user and creates and removes a file.

    Trying beats reading permission bits: ACLs, sticky directories, read-only
    mounts and untraversable parents all count.  The master is still
    single-threaded here, so forking is safe.
    """
    probe = os.path.join(directory, f".prefork-proxy-probe.{os.getpid()}")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _switch(user, group)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
            code = 0
        except BaseException:  # noqa: BLE001 - any failure means "not writable"
            pass
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
