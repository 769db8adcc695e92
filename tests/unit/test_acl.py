"""CIDR rules (prefork_proxy.acl): parsing, its messages, lookup tables, ipaddress as oracle."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_proxy.acl import (
    BAD_ADDRESS,
    DENIED,
    NOT_ALLOWED,
    Acl,
    RangeSet,
    address_key,
    cidr_errors,
    compile_acl,
    parse_cidr,
)


@pytest.mark.parametrize("rules, ip, expected", [
    (["192.0.2.0/24"], "192.0.2.0", True),
    (["192.0.2.0/24"], "192.0.2.255", True),
    (["192.0.2.0/24"], "192.0.3.0", False),
    (["192.0.2.0/24"], "192.0.1.255", False),
    (["192.0.2.7"], "192.0.2.7", True),          # a bare address is a /32
    (["192.0.2.7"], "192.0.2.8", False),
    (["0.0.0.0/0"], "255.255.255.255", True),
    (["0.0.0.0/0"], "2001:db8::1", False),       # IPv4 rules never match real IPv6
    (["192.0.2.0/24"], "::ffff:192.0.2.9", True),  # IPv4-mapped client, IPv4 rule
    (["192.0.2.0/24"], "::ffff:192.0.3.9", False),
    (["::ffff:192.0.2.0/120"], "192.0.2.9", True),  # a mapped rule is the IPv4 rule
    (["::/0"], "10.1.2.3", True),                # as in HAProxy: IPv4 compares as mapped
    (["2001:db8::/32"], "2001:db8:ffff::1", True),
    (["2001:db8::/32"], "2001:db9::", False),
    (["2001:db8::1"], "2001:db8::1", True),      # a bare address is a /128
    (["2001:db8::1"], "2001:db8::2", False),
    (["fe80::/10"], "fe80::1%lo", True),         # a zone from the socket is ignored
    (["10.0.0.0/8", "10.0.0.0/16", "11.0.0.0/8"], "11.255.255.255", True),  # merged
    (["10.0.0.0/9", "10.128.0.0/9"], "10.200.0.1", True),  # adjacent intervals merge
    (["10.0.0.0/16", "10.2.0.0/16"], "10.1.0.1", False),   # the gap stays out
    (["10.0.0.0/32", "10.0.0.2/32"], "10.0.0.1", False),   # even a gap of one address
    (["10.0.0.2/32", "10.0.0.0/32"], "10.0.0.2", True),
    (["::/128"], "::", True),
    (["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", True),
])
def test_allow_table(rules, ip, expected):
    assert compile_acl(rules, None).admits(ip) is expected


@pytest.mark.parametrize("allow, deny, ip, expected", [
    (None, ["192.0.2.66/32"], "192.0.2.66", DENIED),
    (None, ["192.0.2.66/32"], "192.0.2.67", None),          # deny only: everyone else gets in
    (["192.0.2.0/24"], ["192.0.2.66/32"], "192.0.2.66", DENIED),  # deny is checked first
    (["192.0.2.0/24"], ["192.0.2.66/32"], "192.0.2.65", None),
    (["192.0.2.0/24"], ["192.0.2.66/32"], "198.51.100.1", NOT_ALLOWED),
    (["192.0.2.0/24"], [], "198.51.100.1", NOT_ALLOWED),     # empty deny: no deny rules
    ([], ["::/0"], "2001:db8::1", DENIED),                   # empty allow: no allow rules
    (["192.0.2.0/24"], None, "not-an-ip", BAD_ADDRESS),       # fails closed
    (None, ["10.0.0.0/8"], "", BAD_ADDRESS),
    (None, ["10.0.0.0/8"], "1.2.3.4.5", BAD_ADDRESS),
])
def test_allow_deny_table(allow, deny, ip, expected):
    acl = compile_acl(allow, deny)
    assert acl.check(ip) == expected
    assert acl.admits(ip) is (expected is None)


def test_a_listener_without_rules_compiles_to_nothing():
    assert compile_acl(None, None) is None
    assert compile_acl([], []) is None


@pytest.mark.parametrize("rule, message", [
    ("192.0.2.66/24", "'192.0.2.66/24' has host bits set: write 192.0.2.0/24 for the whole "
                      "network or 192.0.2.66/32 for the one address"),
    ("2001:db8::1/32", "'2001:db8::1/32' has host bits set: write 2001:db8::/32 for the whole "
                       "network or 2001:db8::1/128 for the one address"),
    ("192.0.2.0/33", "'192.0.2.0/33': the prefix length 33 is more than the 32 bits of an "
                     "IPv4 address"),
    ("::/129", "'::/129': the prefix length 129 is more than the 128 bits of an IPv6 address"),
    ("192.0.2.0/255.255.255.0", "'192.0.2.0/255.255.255.0': the prefix length after / must be "
                                "a number of bits (0-32); netmasks like 255.255.255.0 are not "
                                "accepted"),
    ("192.0.2.0/", "'192.0.2.0/': the prefix length after / must be a number of bits (0-32); "
                   "netmasks like 255.255.255.0 are not accepted"),
    ("192.0.2.0/-1", "'192.0.2.0/-1': the prefix length after / must be a number of bits "
                     "(0-32); netmasks like 255.255.255.0 are not accepted"),
    ("192.0.2.0/２４", "'192.0.2.0/２４': the prefix length after / must be a number of bits "
                      "(0-32); netmasks like 255.255.255.0 are not accepted"),
    ("db.example/24", "'db.example/24' is not an IPv4 or IPv6 address or CIDR"),
    ("192.0.2", "'192.0.2' is not an IPv4 or IPv6 address or CIDR"),
    ("010.0.0.0/8", "'010.0.0.0/8' is not an IPv4 or IPv6 address or CIDR"),
    ("", "'' is not an IPv4 or IPv6 address or CIDR"),
    ("fe80::%eth0/64", "'fe80::%eth0/64': a zone index (%...) has no place in an address rule"),
    (24, "24 is not a string (a CIDR like \"192.0.2.0/24\" is expected)"),
])
def test_bad_rules_are_refused_with_a_clear_message(rule, message):
    with pytest.raises(ValueError) as caught:
        parse_cidr(rule)
    assert str(caught.value) == message
    assert cidr_errors(["10.0.0.0/8", rule]) == [f"entry 2: {message}"]


def test_host_bits_can_be_masked_as_haproxy_does():
    assert parse_cidr("192.0.2.66/24", strict=False) == parse_cidr("192.0.2.0/24")
    assert compile_acl(["192.0.2.66/24"], None, strict=False).admits("192.0.2.1")
    with pytest.raises(ValueError):
        compile_acl(["192.0.2.66/24"], None)


def test_rule_list_errors():
    assert cidr_errors(["10.0.0.0/8", " 2001:db8::/32 "]) == []
    assert cidr_errors("10.0.0.0/8") == [
        'expected a list of CIDRs like ["192.0.2.0/24", "2001:db8::/32"], not str']


def test_overlapping_rules_merge_into_disjoint_sorted_intervals():
    ranges = RangeSet([parse_cidr(r) for r in
                       ["10.0.0.0/8", "10.1.0.0/16", "9.255.255.255", "12.0.0.0/8", "::/0"]])
    assert len(ranges) == 1  # ::/0 covers everything
    ranges = RangeSet([parse_cidr(r) for r in ["10.0.0.0/8", "10.1.0.0/16", "9.255.255.255",
                                               "12.0.0.0/8"]])
    assert len(ranges) == 2
    assert ranges.starts == sorted(ranges.starts)
    assert all(a < b for a, b in zip(ranges.ends, ranges.starts[1:]))


# -- property: the compiled rules agree with ipaddress on every address

def _oracle_network(rule: str) -> ipaddress.IPv6Network:
    network = ipaddress.ip_network(rule)
    if network.version == 4:
        return ipaddress.IPv6Network(
            (int(ipaddress.IPv6Address("::ffff:0:0")) | int(network.network_address),
             96 + network.prefixlen))
    return network


def _oracle_address(ip: str) -> ipaddress.IPv6Address:
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


def _oracle_check(allow, deny, ip):
    address = _oracle_address(ip)
    if deny and any(address in _oracle_network(r) for r in deny):
        return DENIED
    if allow and not any(address in _oracle_network(r) for r in allow):
        return NOT_ALLOWED
    return None


@st.composite
def _networks(draw):
    if draw(st.booleans()):
        prefix = draw(st.integers(0, 32))
        value = draw(st.integers(0, (1 << 32) - 1)) >> (32 - prefix) << (32 - prefix)
        return str(ipaddress.IPv4Network((value, prefix)))
    prefix = draw(st.integers(0, 128))
    if draw(st.booleans()):  # near the mapped range, where the two families meet
        value = (0xFFFF << 32) | draw(st.integers(0, (1 << 32) - 1))
    else:
        value = draw(st.integers(0, (1 << 128) - 1))
    value = value >> (128 - prefix) << (128 - prefix)
    return str(ipaddress.IPv6Network((value, prefix)))


def _near(network: str, draw) -> str:
    """An address at, just inside or just outside an edge of ``network`` (where bugs live)."""
    net = ipaddress.ip_network(network)
    top = (1 << net.max_prefixlen) - 1
    base = draw(st.sampled_from([int(net.network_address), int(net.broadcast_address)]))
    value = min(top, max(0, base + draw(st.sampled_from([-1, 0, 1]))))
    address = ipaddress.ip_address(value) if net.version == 6 else ipaddress.IPv4Address(value)
    if net.version == 4 and draw(st.booleans()):
        return f"::ffff:{address}"  # the same client as seen by an IPv6 socket
    return str(address)


@st.composite
def _cases(draw):
    allow = draw(st.lists(_networks(), max_size=6))
    deny = draw(st.lists(_networks(), max_size=6))
    rules = allow + deny
    ips = [draw(st.one_of(st.ip_addresses().map(str),
                          st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")))
           for _ in range(4)]
    if rules:
        ips += [_near(draw(st.sampled_from(rules)), draw) for _ in range(8)]
    return allow, deny, ips


@settings(max_examples=400, deadline=None)
@given(_cases())
def test_lookups_agree_with_ipaddress(case):
    allow, deny, ips = case
    acl = Acl(allow, deny)
    for ip in ips:
        assert acl.check(ip) == _oracle_check(allow, deny, ip), ip


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_address_keys_are_the_mapped_integer(address):
    expected = int(address) if address.version == 6 else (0xFFFF << 32) | int(address)
    assert address_key(str(address)) == expected


def test_check_remembers_answers_in_a_bounded_memo() -> None:
    """The per-address memo gives the rules' own answer and never outgrows MEMO_SIZE."""
    acl = compile_acl(["10.0.0.0/8"], ["10.0.0.66/32"])
    assert acl is not None
    for n in range(acl.MEMO_SIZE + 100):
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        assert acl.check(ip) == acl.decide(ip)
        assert len(acl._memo) <= acl.MEMO_SIZE
    assert acl.check("10.0.0.66") == acl.check("10.0.0.66") == DENIED
    assert acl.check("192.0.2.1") == acl.check("192.0.2.1") == NOT_ALLOWED
    assert acl.check("not an address") == BAD_ADDRESS
    assert acl.check(["unhashable"]) == BAD_ADDRESS  # type: ignore[arg-type]
