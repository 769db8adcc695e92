"""Naming processes (``prefork-proxy: master``, ``prefork-proxy: worker 3 gen 1``) for ps and top.

Called by the master at start and on reload, and by each worker right after fork.
Imported at start, not lazily: after privileges are dropped the installation
may no longer be readable.
"""

from __future__ import annotations

try:
    import setproctitle as _setproctitle
except ImportError:  # pragma: no cover - a declared dependency; tolerate its absence
    _setproctitle = None


def set_title(text: str) -> None:
    """Set this process's title; a no-op where ``setproctitle`` is missing."""
    if _setproctitle is not None:
        _setproctitle.setproctitle(text)
