"""Resolving a backend hostname on the spot: the fallback while the health process has not.

Hostnames are resolved by the health-check process (``health``), which writes
every address of each name into shared memory, off the relay threads.  Until
its first answer for a name has arrived (the first second or so after a start
or reload), a balancer calls ``resolve`` here, on a relay thread.  Results,
failures included, are kept for ``CACHE_TTL_S``, so a burst of connections in
that window costs one lookup, not one each; IP literals never get here.
"""

from __future__ import annotations

import socket
import time
from typing import Dict, Tuple, Union

from prefork_proxy.config import Endpoint
from prefork_proxy.relay import Target

CACHE_TTL_S = 1.0

_cache: Dict[Tuple[str, int], Tuple[float, Union[Target, OSError]]] = {}


def resolve(endpoint: Endpoint) -> Target:
    """The first address of ``endpoint`` as a ``Target``; raises ``OSError`` if none."""
    key = (endpoint.host, endpoint.port)
    now = time.monotonic()
    cached = _cache.get(key)
    if cached is not None and cached[0] > now:
        if isinstance(cached[1], OSError):
            raise cached[1]
        return cached[1]
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError as exc:  # a failing DNS must not be asked again by every connection
        _cache[key] = (now + CACHE_TTL_S, exc)
        raise
    family, _, _, _, sockaddr = infos[0]
    target = Target(family, sockaddr, str(endpoint))
    _cache[key] = (now + CACHE_TTL_S, target)
    return target
