"""Prometheus exposition: a ``prometheus_client`` registry rendered as a response body.

Owned by the admin endpoint; called on the admin server's thread (one call per
scrape).  The data comes from the caller's registry, meant to hold custom
collectors that read the proxy's shared memory on each collect (not
``prometheus_client``'s multiprocess mode, whose per-pid files grow with every
respawn); this module knows nothing of where the numbers come from.

``render`` negotiates the format from the scraper's ``Accept`` header:
Prometheus asks for OpenMetrics first and gets it, anything else (or no header)
gets the classic text format.
"""

from __future__ import annotations

from typing import Optional, Tuple

from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from prefork_proxy.admin.httphead import Request
from prefork_proxy.admin.server import Handler


def render(registry: Collector, accept: Optional[str] = None) -> Tuple[str, bytes]:
    """``(content_type, body)`` for a scrape of ``registry``; a collector's error propagates."""
    if accept:
        encoder, content_type = choose_encoder(accept)
        return content_type, encoder(registry)
    return CONTENT_TYPE_LATEST, generate_latest(registry)


def metrics_handler(registry: Collector) -> Handler:
    """A route for ``AdminServer``: ``{"/metrics": metrics_handler(registry)}``.

    A collector that raises makes the server answer 500 and log it; the next
    scrape tries again.
    """

    def handle(request: Request) -> Tuple[int, str, bytes]:
        content_type, body = render(registry, request.header("accept"))
        return 200, content_type, body

    return handle
