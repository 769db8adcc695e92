"""``[server] watch_config``: reload when the config file's content changes.

Owned by the master: ``Master.run`` creates one ``ConfigWatch`` for the file
it was started with, wraps its loader with ``ConfigWatch.loading`` and calls
``poll`` from one guarded step of its loop (which turns at least once a
second).  Nothing here runs in a worker.

Why a content hash and not inotify or mtimes: a Kubernetes ConfigMap volume
is updated by writing a new directory and swapping the ``..data`` symlink
(``config.toml -> ..data/config.toml``), so the watched file itself is never
written; a watch on it misses the change, and an mtime can go backwards.
Reading the file through its path and hashing what is there follows every
swap, rename-over and in-place rewrite alike.  The read is small (a config
file; at most ``MAX_READ`` bytes) and happens at most once per
``POLL_INTERVAL_S``.

A change triggers exactly what SIGHUP does (``Master.reload``): an invalid
new file is logged and the old config keeps serving.  The digest of what was
seen is kept either way, so the same invalid content is not retried every
second; the next change (a fix) reloads again.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable, Optional, TypeVar

log = logging.getLogger("prefork_proxy.config_watch")

#: How often the file is read and hashed.
POLL_INTERVAL_S = 1.0
#: A config file is small; a huge file is hashed by its first bytes only (its
#: load then fails with a clear error anyway).
MAX_READ = 4 << 20

T = TypeVar("T")


def digest_of(path: str) -> Optional[str]:
    """The SHA-256 of the file's content (following symlinks), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read(MAX_READ)).hexdigest()
    except OSError:
        return None


class ConfigWatch:
    """Notices a change of one file's content by polling its hash.  Master only."""

    def __init__(self, path: str, interval_s: float = POLL_INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.digest = digest_of(path)  # of the content the serving config came from
        self.next_poll = 0.0
        self.unreadable = False  # logged once per spell of unreadability

    def loading(self, loader: Callable[[], T]) -> Callable[[], T]:
        """Wrap a loader so that every load (SIGHUP's too) records what it read.

        The digest is taken before the load: if the file changes in between,
        the next poll sees a difference and reloads again (no change is lost).
        """
        def load() -> T:
            digest = digest_of(self.path)
            try:
                return loader()
            finally:
                if digest is not None:
                    self.digest = digest
        return load

    def poll(self, now: float) -> bool:
        """True when the content differs from the last one seen (at most once per change)."""
        if now < self.next_poll:
            return False
        self.next_poll = now + self.interval_s
        digest = digest_of(self.path)
        if digest is None:  # e.g. between a delete and a re-create: wait for it
            if not self.unreadable:
                log.warning("watch_config: cannot read %s; keeping the current config",
                            self.path)
                self.unreadable = True
            return False
        self.unreadable = False
        if digest == self.digest:
            return False
        self.digest = digest
        log.info("watch_config: %s changed; reloading as on SIGHUP", self.path)
        return True
