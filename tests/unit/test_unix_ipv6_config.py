"""``unix:/path`` addresses, ``mode`` and ``v6only``: parsing, validation, listener identity,
and the backend table's unix slots (pure logic; the real sockets are in
tests/integration/test_unix_sockets.py and test_address_families.py)."""

from __future__ import annotations

import socket

import pytest

from prefork_proxy import config
from prefork_proxy.config import Endpoint, parse_endpoint
from prefork_proxy.errors import ConfigError
from prefork_proxy.listeners import listener_key, resolve
from prefork_proxy.shared import ERROR_REASONS, BackendTable, error_reason


def test_unix_addresses_parse_and_print_as_written():
    endpoint = parse_endpoint("unix:/run/pg/.s.PGSQL.5432")
    assert endpoint == Endpoint("", 0, "/run/pg/.s.PGSQL.5432")
    assert endpoint.is_unix and endpoint.is_ip_literal()  # a fixed address: no DNS, one slot
    assert str(endpoint) == "unix:/run/pg/.s.PGSQL.5432"
    assert config.numeric_address(endpoint) == (socket.AF_UNIX, "/run/pg/.s.PGSQL.5432")
    assert not parse_endpoint("[::1]:5432").is_unix


@pytest.mark.parametrize("text, problem", [
    ("unix:run/app.sock", "absolute path"),
    ("unix:", "absolute path"),
    ("unix:/" + "a" * 107, "at most 107 bytes"),
    ("unix:/a\0b", "NUL"),
])
def test_bad_unix_addresses_say_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_endpoint(text)


def _load(body: str) -> config.Config:
    return config.load_text(body, source="proxy.toml")


def test_mode_and_v6only_parse_with_their_defaults():
    loaded = _load("""
[[tcp_proxy]]
bind = "unix:/run/app/front.sock"
mode = "0600"
backends = ["unix:/run/app/back.sock", "127.0.0.1:1"]

[[tcp_proxy]]
bind = "[::]:6380"
v6only = false
backends = ["[::1]:6379"]

[[tcp_proxy]]
bind = "0.0.0.0:6381"
backends = ["[::1]:6379"]
""")
    unix, dual, four = loaded.listeners
    assert unix.mode == 0o600 and unix.bind.path == "/run/app/front.sock"
    assert unix.backends[0].address.path == "/run/app/back.sock"
    assert unix.label == "unix:/run/app/front.sock"  # logs and metrics name it by its bind
    assert (dual.v6only, four.v6only, four.mode) == (False, True, 0o660)


@pytest.mark.parametrize("body, expected", [
    ('bind = "127.0.0.1:1"\nmode = "0600"', 'mode is for a "unix:/path" bind only'),
    ('bind = "unix:/run/x.sock"\nmode = "rw"', "an octal file mode"),
    ('bind = "unix:/run/x.sock"\nmode = 432', "an octal file mode"),
    ('bind = "127.0.0.1:1"\nv6only = false', "v6only is for an IPv6 bind"),
    ('bind = "unix:/run/x.sock"\nreuse_port = true', "reuse_port does not apply"),
    ('bind = "unix:relative.sock"', "absolute path"),
])
def test_misplaced_or_bad_family_keys_are_config_errors(body, expected):
    with pytest.raises(ConfigError, match=expected):
        _load(f"[[tcp_proxy]]\n{body}\nbackends = [\"127.0.0.1:2\"]\n")


def test_two_listeners_on_one_unix_path_are_refused_and_the_admin_takes_no_path():
    with pytest.raises(ConfigError, match="duplicate bind address"):
        _load("""
[[tcp_proxy]]
bind = "unix:/run/x.sock"
backends = ["127.0.0.1:2"]
[[tcp_proxy]]
bind = "unix:/run/x.sock"
backends = ["127.0.0.1:3"]
""")
    with pytest.raises(ConfigError, match="unix socket is not supported here"):
        _load('[admin]\nbind = "unix:/run/admin.sock"\n[[tcp_proxy]]\nbind = "127.0.0.1:1"\n'
              'backends = ["127.0.0.1:2"]\n')


def test_a_unix_listener_is_keyed_by_its_path():
    listener = _load('[[tcp_proxy]]\nbind = "unix:/run/x.sock"\nbackends = ["127.0.0.1:2"]\n'
                     ).listeners[0]
    assert resolve(listener.bind) == (socket.AF_UNIX, 0, "/run/x.sock")
    # Not the "port 0" key by position: a reload that moves it keeps its socket.
    assert listener_key(listener, 0) == listener_key(listener, 5) == (socket.AF_UNIX,
                                                                       "/run/x.sock")


def test_the_backend_table_holds_unix_paths_and_ipv6_addresses():
    table = BackendTable(slots=4)
    table.set_address(0, socket.AF_UNIX, "/run/pg/.s.PGSQL.5432")
    table.set_address(1, socket.AF_INET6, ("::1", 5432, 0, 0))
    assert table.address(0) == (socket.AF_UNIX, "/run/pg/.s.PGSQL.5432")
    assert table.address(1) == (socket.AF_INET6, ("::1", 5432, 0, 0))
    assert table.eligible(0, 0.0)


def test_a_missing_unix_socket_file_counts_as_refused():
    assert ERROR_REASONS[error_reason("No such file or directory")] == "refused"
    assert ERROR_REASONS[error_reason("Connection refused")] == "refused"
