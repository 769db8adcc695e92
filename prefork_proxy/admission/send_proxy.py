"""The PROXY header a backend gets before the first byte (``send_proxy``), and the health check's.

Pure, stateless, thread-safe: called on a relay thread once per backend
connect (after the connect succeeds, before ``Accept.forward_prefix``), and in
the health-check process once per probe.  Wire formats are
``proxy_protocol``'s; this module only decides what to encode:

- a connection: ``proxy_header(version, accept.client_address, accept.destination)``.
  TCP4/TCP6 for an IP client (an IPv4 and an IPv6 end are both sent as IPv6,
  mapped); a client without an IP (a unix-socket peer) gives v1 ``UNKNOWN``
  or v2 ``LOCAL`` (family ``UNSPEC``): the receiver uses the real endpoints.
  LOCAL rather than ``PROXY`` + ``UNSPEC``, as HAProxy sends too: every v2
  receiver must take LOCAL, while some refuse a PROXY command without addresses.
- a health check: ``health_check_header(version)``: v2 ``LOCAL`` ("this
  connection is the proxy's own", so a backend requiring the header does not
  take the probe for a client), v1 ``UNKNOWN`` (v1 has no LOCAL; the spec
  says UNKNOWN is what a proxy sends for its own connections).
"""

from __future__ import annotations

from prefork_proxy.proxy_protocol import encode_v1, encode_v2, encode_v2_local

from .verdicts import Address

VERSIONS = ("v1", "v2")
_HEALTH_V1 = b"PROXY UNKNOWN\r\n"


def proxy_header(version: str, client: Address, destination: Address) -> bytes:
    """The header to send first to a backend with ``send_proxy = version``.

    Called once per connection.  The encoders read only an address's first two
    items (ip, port), so a socket's longer IPv6 tuple is passed as it is, not sliced.
    """
    if version == "v2":
        if isinstance(client, tuple) and isinstance(destination, tuple):
            return encode_v2(client, destination)  # type: ignore[arg-type]
        return encode_v2_local()  # a unix end (a path): unknown, so neither is sent
    if version == "v1":
        return encode_v1(client, destination)  # type: ignore[arg-type]  # UNKNOWN unless IPs
    raise ValueError(f"send_proxy must be 'v1' or 'v2', not {version!r}")


def health_check_header(version: str) -> bytes:
    """The header a health probe sends first to a backend with ``send_proxy = version``."""
    if version == "v2":
        return encode_v2_local()
    if version == "v1":
        return _HEALTH_V1
    raise ValueError(f"send_proxy must be 'v1' or 'v2', not {version!r}")
