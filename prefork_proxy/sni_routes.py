"""Matching a TLS server name (and ALPN list) to a route: the one module that owns it.

Pure data, no I/O: a ``ServerNameTable`` is built once from a listener's routes
(in the master when the config is loaded, or in a worker after fork: it is
immutable, so any thread may share it) and answers ``lookup`` with the index
of the route a ClientHello goes to, or None for the listener's own backends.

Rules (issue 13):

- Names are compared case-insensitively, with one trailing dot ignored, on
  both sides (``normalize_server_name``).
- An exact name wins over a wildcard.  A wildcard is one leading ``*.`` label
  and matches exactly one label in its place: ``*.api.example.com`` matches
  ``a.api.example.com``, not ``api.example.com`` nor ``a.b.api.example.com``.
  Because a wildcard stands for exactly one label, at most one wildcard
  suffix can fit a name (the name minus its first label), so "the longest
  wildcard" needs no search: one dict lookup.
- A route may also list ALPN protocols: it then matches only a client that
  offers at least one of them.  Among routes listing the same name, the first
  in config order whose ALPN condition holds wins; when none holds at the
  exact stage, the wildcard stage is tried, then the default.
- A route that could never be chosen (the same name earlier with no ALPN
  condition, or with a superset of its protocols) is a config error, raised
  here as ``ValueError`` for the config loader to report with file and line.

Cost: ``lookup`` is two dict lookups and a string lower(); no loop over routes
unless several routes share one name (each with its own ALPN list).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

from prefork_proxy.client_hello import normalize_server_name

#: (route index, ALPN protocols the route requires or None for any)
_Candidate = Tuple[int, Optional[FrozenSet[bytes]]]


def _check_pattern(pattern: str) -> Tuple[bool, str]:
    """(is_wildcard, normalized key) of one configured name; ValueError when malformed."""
    if not isinstance(pattern, str):
        raise ValueError(f"server name {pattern!r} is not a string")
    name = normalize_server_name(pattern)
    wildcard = name.startswith("*.")
    key = name[2:] if wildcard else name
    if not key:
        raise ValueError(f"server name {pattern!r} is empty")
    if "*" in key:
        raise ValueError(
            f"server name {pattern!r}: a wildcard is one whole leading label (*.example.com)"
        )
    if any(not label for label in key.split(".")):
        raise ValueError(f"server name {pattern!r} has an empty label")
    if any(c <= " " or c > "~" for c in key):
        raise ValueError(f"server name {pattern!r} is not printable ASCII")
    return wildcard, key


class ServerNameTable:
    """Server name -> route index, built once from the routes in config order.

    ``server_names[i]`` are route ``i``'s names; ``alpn[i]`` (optional, None or
    empty for "any") its ALPN protocols, as str (encoded UTF-8) or bytes.
    """

    def __init__(
        self,
        server_names: Sequence[Sequence[str]],
        alpn: Sequence[Optional[Sequence[object]]] = (),
    ) -> None:
        if alpn and len(alpn) != len(server_names):
            raise ValueError("alpn must have one entry per route")
        self._exact: Dict[str, List[_Candidate]] = {}
        self._wildcard: Dict[str, List[_Candidate]] = {}
        for index, names in enumerate(server_names):
            if isinstance(names, str):
                raise ValueError(f"route {index}: server_names must be a list of names")
            protocols = _protocols(alpn[index] if alpn else None)
            for pattern in names:
                wildcard, key = _check_pattern(pattern)
                table = self._wildcard if wildcard else self._exact
                earlier = table.setdefault(key, [])
                for other, other_protocols in earlier:
                    if other_protocols is None or (
                        protocols is not None and protocols <= other_protocols
                    ):
                        raise ValueError(
                            f"route {index}: server name {pattern!r} can never match: "
                            f"route {other} takes every client that names it"
                        )
                earlier.append((index, protocols))

    def lookup(self, server_name: Optional[str], alpn: Iterable[bytes] = ()) -> Optional[int]:
        """The index of the route for this server name and offered ALPN list, or None.

        ``server_name`` as sent (it is normalized here); None (no SNI) never
        matches a route.
        """
        if not server_name:
            return None
        name = normalize_server_name(server_name)
        offered: Optional[FrozenSet[bytes]] = None  # built only if a route asks
        candidates = self._exact.get(name)
        if candidates:
            chosen, offered = _first_match(candidates, alpn, offered)
            if chosen is not None:
                return chosen
        dot = name.find(".")
        if dot > 0:
            candidates = self._wildcard.get(name[dot + 1 :])
            if candidates:
                chosen, offered = _first_match(candidates, alpn, offered)
                return chosen
        return None


def _protocols(values: Optional[Sequence[object]]) -> Optional[FrozenSet[bytes]]:
    if not values:
        return None
    result = set()
    for value in values:
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes) or not 1 <= len(value) <= 255:
            raise ValueError(f"ALPN protocol {value!r} must be 1 to 255 bytes")
        result.add(value)
    return frozenset(result)


def _first_match(
    candidates: List[_Candidate], alpn: Iterable[bytes], offered: Optional[FrozenSet[bytes]]
) -> Tuple[Optional[int], Optional[FrozenSet[bytes]]]:
    for index, protocols in candidates:
        if protocols is None:
            return index, offered
        if offered is None:
            offered = frozenset(alpn)
        if protocols & offered:
            return index, offered
    return None, offered
