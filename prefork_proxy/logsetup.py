"""Logging: where lines go (stderr or a file) and reopening files for logrotate.

Configured once by the CLI in the process that becomes the master; workers
inherit the handlers through fork.  On SIGUSR1 the master calls
``reopen_log_files`` and signals every worker to do the same, so after
logrotate renames the file, every process writes to a new one at the old path.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

log = logging.getLogger("prefork_proxy.logsetup")

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


def configure(level: str = "info", log_file: Optional[str] = None) -> None:
    """Send every record at ``level`` and above to ``log_file`` (appended) or stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def reopen_log_files() -> int:
    """Reopen every file handler at its path; return how many were reopened.

    Never raises: a file that cannot be reopened (the path became a
    directory, logrotate's ``create`` made it unwritable for the serving
    user) is reported on the old stream, which stays in use, so a SIGUSR1
    never takes a process down.
    """
    reopened = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            reopened += reopen_handler(handler)
    return reopened


def reopen_handler(handler: logging.FileHandler) -> bool:
    """Open ``handler``'s path again and swap it in; on failure keep the old stream."""
    handler.acquire()
    try:
        old = handler.stream
        try:
            handler.stream = handler._open()
        except OSError as exc:
            error: Optional[OSError] = exc
        else:
            error = None
            if old is not None:
                old.close()
    finally:
        handler.release()
    if error is not None:
        log.error("cannot reopen the log file %s: %s; still writing to the file open before",
                  handler.baseFilename, error.strerror or error)
        return False
    return True
