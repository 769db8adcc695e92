"""Client address rules (``allow``/``deny``): CIDRs compiled once, one lookup per connection.

Who owns what: ``compile_acl`` runs once per listener and config, in each
worker at boot (``admission.compile_pipeline``, called by
``gate.listener_gate``); ``Acl.check``/``Acl.admits`` run on a worker's relay
thread (the admission step's) for every accepted connection,
with the client address as the socket (or an accepted PROXY header) gives it:
a ``str``.  ``cidr_errors`` is for config validation: it returns one clear
message per bad entry and raises nothing.

One key space for both families.  Every address is a 128-bit integer: IPv6
as it is, IPv4 ``a.b.c.d`` as the IPv4-mapped ``::ffff:a.b.c.d`` (and an IPv4
rule ``a.b.c.d/p`` as ``::ffff:a.b.c.d/(96+p)``).  So a client that reaches an
IPv6 socket from IPv4 (``::ffff:192.0.2.7``) matches IPv4 rules with no
special case, and an IPv6 rule that covers the mapped range (``::/0``,
``::ffff:0:0/96``) matches IPv4 clients too: HAProxy compares an IPv4 sample
with an IPv6 pattern the same way, through its mapped form.

Compilation: every rule is an interval ``[first, last]`` of that space; the
intervals of one list are sorted and merged into disjoint ones, kept as two
plain lists of ints.  A lookup is one ``inet_pton``, one ``int.from_bytes``
and one ``bisect`` over the starts: O(log n), no allocation beyond the int.

Host bits: ``192.0.2.66/24`` is refused with a message naming both readings
(``192.0.2.0/24`` or ``192.0.2.66/32``), where HAProxy and nginx accept it and
mask the host bits (nginx with a warning).  In an access rule the two
readings differ by 255 addresses let in or kept out, so the config must say
which it means; ``parse_cidr(..., strict=False)`` masks, for callers that
want HAProxy's behaviour.  A bare address is a one-address rule (``/32``,
``/128``), as in HAProxy and nginx.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

_MAPPED = 0xFFFF << 32  # ::ffff:0.0.0.0, where IPv4 lives in the 128-bit space

#: ``Acl.check`` results, also the ``reason`` label of a refused connection.
DENIED = "denied"          # matched a ``deny`` rule
NOT_ALLOWED = "not_allowed"  # ``allow`` is set and matched nothing
BAD_ADDRESS = "bad_address"  # not an IP address (fails closed)


def parse_cidr(text: str, strict: bool = True) -> Tuple[int, int]:
    """``(first, last)`` of a CIDR or bare address in the 128-bit space; ValueError if bad.

    The message of the ValueError is meant for the user as it is.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string (a CIDR like \"192.0.2.0/24\" is expected)")
    raw = text.strip()
    address, slash, prefix_text = raw.partition("/")
    if "%" in address:
        raise ValueError(f"{text!r}: a zone index (%...) has no place in an address rule")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 or IPv6 address or CIDR") from None
    bits = ip.max_prefixlen
    if slash:
        if not prefix_text.isdigit() or not prefix_text.isascii():
            raise ValueError(f"{text!r}: the prefix length after / must be a number of bits "
                             f"(0-{bits}); netmasks like 255.255.255.0 are not accepted")
        prefix = int(prefix_text)
        if prefix > bits:
            raise ValueError(f"{text!r}: the prefix length {prefix} is more than the "
                             f"{bits} bits of an IPv{ip.version} address")
    else:
        prefix = bits
    value = int(ip)
    host_mask = (1 << (bits - prefix)) - 1
    if value & host_mask:
        if strict:
            network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            raise ValueError(f"{text!r} has host bits set: write {network} for the whole "
                             f"network or {ip}/{bits} for the one address")
        value &= ~host_mask
    if ip.version == 4:
        value |= _MAPPED
    return value, value | host_mask


def cidr_errors(rules: object, strict: bool = True) -> List[str]:
    """For config validation: one message per bad entry of a rule list (empty: all good)."""
    if not isinstance(rules, (list, tuple)):
        return [f"expected a list of CIDRs like [\"192.0.2.0/24\", \"2001:db8::/32\"], "
                f"not {type(rules).__name__}"]
    errors = []
    for index, rule in enumerate(rules):
        try:
            parse_cidr(rule, strict=strict)
        except ValueError as exc:
            errors.append(f"entry {index + 1}: {exc}")
    return errors


def address_key(ip: str) -> int:
    """A client address (``str`` as the socket gives it) as a key; ValueError if not an IP."""
    if ":" not in ip:
        return _MAPPED | int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    if "%" in ip:  # a link-local peer may come with its zone: the rule is about the address
        ip = ip.split("%", 1)[0]
    return int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")


class RangeSet:
    """Disjoint sorted intervals of the 128-bit space; ``contains`` is one bisect."""

    __slots__ = ("starts", "ends")

    def __init__(self, intervals: Iterable[Tuple[int, int]]) -> None:
        merged: List[List[int]] = []
        for first, last in sorted(intervals):
            if merged and first <= merged[-1][1] + 1:  # overlapping or adjacent: one interval
                if last > merged[-1][1]:
                    merged[-1][1] = last
            else:
                merged.append([first, last])
        self.starts = [first for first, _ in merged]
        self.ends = [last for _, last in merged]

    def __len__(self) -> int:
        return len(self.starts)

    def contains(self, key: int) -> bool:
        index = bisect.bisect_right(self.starts, key) - 1
        return index >= 0 and key <= self.ends[index]


class Acl:
    """A listener's compiled ``allow``/``deny``: ``deny`` first; if ``allow`` is set, only it.

    The rules are immutable once built; shared by every relay thread of a worker
    without a lock.  ``check`` remembers its answer per address string (a
    client reconnecting, a PROXY-sending balancer's few addresses: one dict
    lookup instead of the parse and the bisects); the memo is bounded
    (``MEMO_SIZE``, emptied when full) and each of its single-key operations is
    atomic under the interpreter lock, so threads share it as they share the rules.
    """

    __slots__ = ("allow", "deny", "_memo")

    #: Addresses whose answer ``check`` remembers before it starts over.
    MEMO_SIZE = 4096

    def __init__(self, allow: Optional[Sequence[str]], deny: Optional[Sequence[str]],
                 strict: bool = True) -> None:
        # None (key absent) and [] (empty list) both mean "no such rule list".
        self.allow = RangeSet(parse_cidr(r, strict) for r in allow) if allow else None
        self.deny = RangeSet(parse_cidr(r, strict) for r in deny) if deny else None
        self._memo: Dict[str, Optional[str]] = {}

    def check(self, ip: str) -> Optional[str]:
        """None if ``ip`` may connect, else why not (see ``decide``); remembered per address."""
        memo = self._memo
        try:
            return memo[ip]
        except KeyError:
            pass
        except TypeError:  # not hashable: not an address either
            return BAD_ADDRESS
        answer = self.decide(ip)
        if len(memo) >= self.MEMO_SIZE:
            memo.clear()
        memo[ip] = answer
        return answer

    def decide(self, ip: str) -> Optional[str]:
        """None if ``ip`` may connect, else why not (``DENIED``, ``NOT_ALLOWED``, ``BAD_ADDRESS``).

        An address that does not parse is refused: the socket always gives a
        valid one, so this means a bug upstream, and an ACL fails closed.
        """
        try:
            key = address_key(ip)
        except (OSError, ValueError, TypeError):
            return BAD_ADDRESS
        if self.deny is not None and self.deny.contains(key):
            return DENIED
        if self.allow is not None and not self.allow.contains(key):
            return NOT_ALLOWED
        return None

    def admits(self, ip: str) -> bool:
        return self.check(ip) is None


def compile_acl(allow: Optional[Sequence[str]], deny: Optional[Sequence[str]],
                strict: bool = True) -> Optional[Acl]:
    """The compiled rules of a listener, or None when it has none (its connections pay nothing)."""
    if not allow and not deny:
        return None
    return Acl(allow, deny, strict)
