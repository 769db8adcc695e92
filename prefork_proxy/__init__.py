"""prefork-proxy: a protocol-agnostic Layer-4 (raw TCP) reverse proxy.

Typical use, from Python::

    from prefork_proxy import TcpProxy
    TcpProxy(["db-1:5432", "db-2:5432"], connect_timeout_ms=3000).bind("0.0.0.0:5432")

or from the shell: ``prefork-proxy start --config proxy.toml``.

A master process binds the listeners and forks workers; each worker relays
connections on a small fixed pool of event-loop threads, moving bytes with
``splice(2)`` where the kernel allows it.  See README.md for the whole story.
"""

from __future__ import annotations

from prefork_proxy.api import TcpProxy

__all__ = ["TcpProxy"]
#: The one place the version is written: pyproject.toml reads it (``dynamic = ["version"]``)
#: into the package metadata, which ``prefork-proxy --version`` prints.
__version__ = "0.1.0"
