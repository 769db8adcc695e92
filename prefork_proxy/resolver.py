"""Turning a backend's ``host:port`` into socket addresses, at connect time.

Called from relay threads when a connection needs its next backend.  Names are
resolved when connecting, not once at start, so a backend whose DNS record
changes is followed.  Results are kept for ``CACHE_TTL_S`` so a burst of
connections costs one lookup, not one each; IP literals never reach DNS.
"""

from __future__ import annotations

import socket
import time
from typing import Dict, Tuple

from prefork_proxy.config import Endpoint
from prefork_proxy.relay import Target

CACHE_TTL_S = 1.0

_cache: Dict[Tuple[str, int], Tuple[float, Target]] = {}


def resolve(endpoint: Endpoint) -> Target:
    """The first address of ``endpoint`` as a ``Target``; raises ``OSError`` if none."""
    key = (endpoint.host, endpoint.port)
    now = time.monotonic()
    cached = _cache.get(key)
    if cached is not None and cached[0] > now:
        return cached[1]
    infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    target = Target(family, sockaddr, str(endpoint))
    _cache[key] = (now + CACHE_TTL_S, target)
    return target
