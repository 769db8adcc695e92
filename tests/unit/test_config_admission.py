"""Config keys of the pre-connect phase (issue 12): they parse, default to off, and bad
values name file, line, section and key."""

from __future__ import annotations

import pytest

from prefork_proxy import config
from prefork_proxy.errors import ConfigError

HEAD = '[[tcp_proxy]]\nbind = "127.0.0.1:0"\n'
BACKENDS = 'backends = ["127.0.0.1:1", { address = "127.0.0.1:2", send_proxy = "v1" }]\n'


def test_admission_keys_parse():
    text = HEAD + BACKENDS + """accept_proxy = "v2"
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]
proxy_timeout_ms = 500
send_proxy = "v2"
allow = ["192.0.2.0/24", "2001:db8::/32"]
deny = ["192.0.2.66/32"]
max_connections = 5000
max_connections_per_source = 50
max_new_connections_per_source = 100
sni_timeout_ms = 700
"""
    lst = config.load_text(text).listeners[0]
    assert lst.accept_proxy == "v2" and lst.trusted_proxies == ("10.0.0.0/8", "fd00::/8")
    assert lst.proxy_timeout_ms == 500 and lst.sni_timeout_ms == 700
    assert lst.allow == ("192.0.2.0/24", "2001:db8::/32") and lst.deny == ("192.0.2.66/32",)
    assert (lst.max_connections, lst.max_connections_per_source,
            lst.max_new_connections_per_source) == (5000, 50, 100)
    assert lst.has_limits
    # The backend's own key wins; the other gets the listener's.
    assert [lst.backend_send_proxy(b) for b in lst.backends] == ["v2", "v1"]


def test_admission_keys_default_to_off():
    lst = config.load_text(HEAD + 'backends = ["127.0.0.1:1"]\n').listeners[0]
    assert lst.accept_proxy is None and lst.trusted_proxies is None and lst.send_proxy is None
    assert lst.allow is None and lst.deny is None and not lst.has_limits
    assert lst.proxy_timeout_ms == 3000 and lst.sni_timeout_ms == 3000
    assert lst.backend_send_proxy(lst.backends[0]) is None


@pytest.mark.parametrize("line, expected", [
    ('accept_proxy = "v3"', ':3: tcp_proxy[1] (bind "127.0.0.1:0"): key "accept_proxy": '
                            'expected one of "v1", "v2", "any", got a string \'v3\''),
    ('allow = ["10.0.0.0/33"]', ':3: tcp_proxy[1] (bind "127.0.0.1:0"): key "allow": '
                                'expected a non-empty list of CIDRs'),
    ('deny = []', ':3: tcp_proxy[1] (bind "127.0.0.1:0"): key "deny": expected a non-empty'),
    ('trusted_proxies = ["10.0.0.0/8"]', 'key "trusted_proxies": trusted_proxies needs '
                                         'accept_proxy'),
    ('send_proxy = "v1 "', 'key "send_proxy": expected one of "v1", "v2"'),
    ('max_connections_per_source = -1', 'key "max_connections_per_source": expected an '
                                        'integer between 0 and'),
    ('proxy_timeout_ms = 0', 'key "proxy_timeout_ms": expected an integer'),
    ('max_connections = true', 'key "max_connections": expected an integer'),
])
def test_bad_admission_keys_name_file_line_section_key(line, expected):
    with pytest.raises(ConfigError) as info:
        config.load_text(HEAD + line + "\n" + 'backends = ["127.0.0.1:1"]\n', source="p.toml")
    assert expected in str(info.value)
    assert str(info.value).startswith("p.toml:")


def test_bad_backend_send_proxy_names_the_backend():
    text = HEAD + 'backends = [{ address = "127.0.0.1:2", send_proxy = "v9" }]\n'
    with pytest.raises(ConfigError, match=r'p.toml:3: .*key "backends": backends\[1\]: '
                                          r'send_proxy: expected one of "v1", "v2"'):
        config.load_text(text, source="p.toml")


ROUTES = HEAD + 'backends = ["127.0.0.1:1"]\n' + """
[[tcp_proxy.routes]]
server_names = ["a.test", "*.api.test"]
backends = ["127.0.0.1:2"]

[[tcp_proxy.routes]]
server_names = [NAMES]
backends = ["127.0.0.1:3"]
balance = BALANCE
alpn = ["h2"]
"""


@pytest.mark.parametrize("names, balance, expected", [
    ('"b.test"', '"nope"', 'p.toml:12: tcp_proxy[1] (bind "127.0.0.1:0"): key '
                           '"routes[2].balance": expected one of "round_robin"'),
    ('"A.test."', '"least_conn"', 'p.toml:9: tcp_proxy[1] (bind "127.0.0.1:0"): key '
                                  '"routes[2]": server_names: route 2: server name '
                                  "'A.test.' can never match: route 1 takes every client"),
    ('"*.*.test"', '"least_conn"', 'p.toml:9: tcp_proxy[1] (bind "127.0.0.1:0"): key '
                                   '"routes[2]": server_names: server name \'*.*.test\''),
    # Two routes with one name (the second's first server name is the first's name).
    ('"b.test"', '"least_conn"\nname = "a.test"',
     'p.toml:13: tcp_proxy[1] (bind "127.0.0.1:0"): key "routes[2].name": route 1 is '
     "already named 'a.test'"),
    ('"b.test"', '"least_conn"\nconnect_budget_ms = 10\nconnect_timeout_ms = 20',
     'p.toml:13: tcp_proxy[1] (bind "127.0.0.1:0"): key "routes[2].connect_budget_ms": '
     'expected at least connect_timeout_ms (20), got 10'),
])
def test_routes_are_validated_with_the_server_name_table(names, balance, expected):
    text = ROUTES.replace("NAMES", names).replace("BALANCE", balance)
    with pytest.raises(ConfigError) as info:
        config.load_text(text, source="p.toml")
    assert expected in str(info.value)


def test_valid_routes_are_loaded_as_pools_of_their_own():
    loaded = config.load_text(ROUTES.replace("NAMES", '"b.test"').replace("BALANCE",
                                                                         '"least_conn"'))
    listener = loaded.listeners[0]
    first, second = listener.route_pools()
    assert (first.route_name, second.route_name) == ("a.test", "b.test")
    assert second.balance == "least_conn" and first.balance == "round_robin"
    assert [str(b.address) for b in second.backends] == ["127.0.0.1:3"]
    assert second.label == listener.label and second.bind == listener.bind


def test_a_listener_with_routes_may_have_no_backends_of_its_own():
    text = HEAD + """
[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["127.0.0.1:2"]
send_proxy = "v2"
"""
    listener = config.load_text(text).listeners[0]
    assert listener.backends == ()
    assert listener.route_pools()[0].send_proxy == "v2"
    with pytest.raises(ConfigError, match=r'p.toml:1: tcp_proxy\[1\] \(bind "127.0.0.1:0"\): '
                                          r'key "backends": missing: expected a list'):
        config.load_text(HEAD, source="p.toml")
