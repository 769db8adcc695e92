"""The Python API, in the spirit of the seed's builder.

    TcpProxy(["db-1:5432", "db-2:5432"], connect_timeout_ms=3000).bind("0.0.0.0:5432")

``bind`` turns the calling process into the master: it forks the workers and
blocks until the proxy is stopped (SIGTERM or SIGINT), then returns the exit
code.  Errors in the arguments raise ``ConfigError`` before anything is bound.
"""

from __future__ import annotations

from typing import Optional, Sequence

from prefork_proxy import config as config_module


class TcpProxy:
    """A listener-to-be: its backends and connect timeout, waiting for ``bind``."""

    def __init__(self, backends: Sequence[str], *,
                 connect_timeout_ms: int = config_module.DEFAULT_CONNECT_TIMEOUT_MS) -> None:
        self.backends = list(backends)
        self.connect_timeout_ms = connect_timeout_ms

    def bind(self, address: str, *, workers: Optional[int] = None,
             threads: Optional[int] = None, relay: Optional[str] = None) -> int:
        """Serve ``address`` with ``workers`` processes (default: CPU count); blocks."""
        from prefork_proxy.master import serve

        config = config_module.from_arguments([address], self.backends,
                                              connect_timeout_ms=self.connect_timeout_ms,
                                              workers=workers, threads=threads, relay=relay)
        return serve(config)
