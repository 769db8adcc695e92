"""Naming processes (``prefork-proxy: master``, ``prefork-proxy: worker 3``) for ps and top.

Called by the master at start and by each worker right after fork.
"""

from __future__ import annotations


def set_title(text: str) -> None:
    """Set this process's title; a no-op where ``setproctitle`` cannot be imported."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency; tolerate its absence
        return
    setproctitle.setproctitle(text)
