"""Config validation as a table: good files parse, bad files give the expected message."""

from __future__ import annotations

import socket
import sys

import pytest

from prefork_proxy import config
from prefork_proxy.config import Backend, Endpoint
from prefork_proxy.errors import ConfigError

GOOD = """
[server]
workers = 4
threads = 3
relay = "copy"
drain_timeout_s = 2.5

[[tcp_proxy]]
bind = "0.0.0.0:5432"
backends = ["db-primary:5432", { address = "10.0.0.2:5432", weight = 3 }]
connect_timeout_ms = 3000

[[tcp_proxy]]
bind = "[::1]:6380"
backends = ["[::1]:6379", { address = "cache:6379", backup = true }]
"""


def test_good_file_parses_into_dataclasses():
    loaded = config.load_text(GOOD, source="proxy.toml")
    assert loaded.server.workers == 4 and loaded.server.threads == 3
    assert loaded.server.relay == "copy" and loaded.server.drain_timeout_s == 2.5
    first, second = loaded.listeners
    assert first.bind == Endpoint("0.0.0.0", 5432)
    assert first.backends == (Backend(Endpoint("db-primary", 5432)),
                              Backend(Endpoint("10.0.0.2", 5432), weight=3))
    assert first.connect_timeout_ms == 3000
    assert second.bind == Endpoint("::1", 6380) and str(second.bind) == "[::1]:6380"
    assert second.connect_timeout_ms == 5000  # the seed's default
    assert second.backends[1].backup is True


def test_balancing_and_health_keys_parse():
    loaded = config.load_text(LISTENER + """balance = "least_conn"
retries = 1
connect_budget_ms = 6000
fall = 5
fail_timeout_ms = 2000
resolve_interval_ms = 1000

[tcp_proxy.health_check]
interval_ms = 500
rise = 3
send = "PING\\r\\n"
expect = "+PONG"
""")
    listener = loaded.listeners[0]
    assert (listener.balance, listener.retries, listener.connect_budget_ms) == \
        ("least_conn", 1, 6000)
    assert (listener.fall, listener.fail_timeout_ms, listener.resolve_interval_ms) == \
        (5, 2000, 1000)
    assert listener.health_check == config.HealthCheck(interval_ms=500, timeout_ms=500, rise=3,
                                                       fall=3, send=b"PING\r\n",
                                                       expect=b"+PONG")
    defaults = config.load_text(LISTENER).listeners[0]
    assert (defaults.balance, defaults.retries, defaults.connect_budget_ms) == \
        ("round_robin", None, None)
    assert (defaults.fall, defaults.fail_timeout_ms, defaults.health_check) == (3, 10000, None)
    inline = config.load_text(LISTENER + "health_check = { interval_ms = 3000 }\n")
    assert inline.listeners[0].health_check == config.HealthCheck(interval_ms=3000)


def test_auto_threads_is_one_per_worker_under_a_gil():
    # Pure: two busy relay threads in one interpreter trade the GIL on every
    # system call (issue 15), so "auto" is one thread unless there is no GIL.
    assert config.auto_relay_threads(cpus=2, workers=1, gil=True) == 1
    assert config.auto_relay_threads(cpus=64, workers=1, gil=True) == 1
    assert config.auto_relay_threads(cpus=8, workers=2, gil=False) == 4
    assert config.auto_relay_threads(cpus=2, workers=8, gil=False) == 1  # never fewer than one
    assert config.auto_relay_threads(cpus=2, workers=0, gil=False) == 2


def test_auto_threads_as_configured():
    def threads(server: str) -> int:
        text = server + '[[tcp_proxy]]\nbind = "127.0.0.1:1"\nbackends = ["a:2"]\n'
        return config.load_text(text).server.relay_threads

    cpus = config.usable_cpus()
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    assert threads('[server]\nworkers = 1\nthreads = "auto"\n') == (1 if gil else cpus)
    assert threads(f"[server]\nworkers = {cpus * 4}\n") == 1  # never fewer than one
    assert threads("[server]\nworkers = 1\nthreads = 3\n") == 3  # an explicit count wins


def test_defaults_without_server_section():
    loaded = config.load_text('[[tcp_proxy]]\nbind = "127.0.0.1:1"\nbackends = ["a:2"]\n')
    assert loaded.server.workers >= 1 and loaded.server.threads is None  # "auto"
    assert loaded.server.relay_threads == config.auto_relay_threads(
        config.usable_cpus(), loaded.server.workers, config.gil_enabled())
    assert loaded.server.relay == "auto" and loaded.server.drain_timeout_s == 30.0


def test_workers_override():
    loaded = config.load_text(GOOD, workers=7)
    assert loaded.server.workers == 7


LISTENER = '[[tcp_proxy]]\nbind = "127.0.0.1:7000"\nbackends = ["127.0.0.1:7001"]\n'

BAD = [
    # (file text, expected fragment of the message)
    ("[[tcp_proxy]\nbind = 1", "proxy.toml: invalid TOML"),
    ("", "no [[tcp_proxy]] section"),
    ("[server]\nworkers = 2\n", "no [[tcp_proxy]] section"),
    ("[[tcp_proxy]]\nbackends = [\"a:1\"]\n",
     'proxy.toml:1: tcp_proxy[1]: key "bind": missing'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1\"\nbackends = [\"a:1\"]\n",
     'proxy.toml:2: tcp_proxy[1] (bind "127.0.0.1"): key "bind": expected "host:port"'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:99999\"\nbackends = [\"a:1\"]\n",
     'key "bind": expected a port between 0 and 65535'),
    ("[[tcp_proxy]]\nbind = \"::1:80\"\nbackends = [\"a:1\"]\n", "needs brackets"),
    ("[[tcp_proxy]]\nbind = 5432\nbackends = [\"a:1\"]\n",
     'key "bind": expected a "host:port" string, got an integer 5432'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\n",
     'tcp_proxy[1] (bind "127.0.0.1:7000"): key "backends": missing'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = []\n",
     'proxy.toml:3: tcp_proxy[1] (bind "127.0.0.1:7000"): key "backends": expected a '
     'non-empty list'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = \"a:1\"\n",
     'key "backends": expected a non-empty list'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [\"a:0\"]\n",
     'key "backends": backends[1]: expected a port between 1 and 65535'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [\"a:1\", \"bad host:2\"]\n",
     "backends[2]: expected a hostname or IP address"),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [{ adress = \"a:1\" }]\n",
     'backends[1]: unknown key "adress"'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [{ address = \"a:1\", weight = 0 }]\n",
     "backends[1]: weight: expected an integer between 1 and 1000"),
    (LISTENER + "connect_timeout_ms = \"3s\"\n",
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "connect_timeout_ms": expected an '
     'integer number of milliseconds'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [\"a:1\"]\nconect_timeout_ms = 5\n",
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "conect_timeout_ms": unknown key'),
    (LISTENER + LISTENER,
     'proxy.toml:5: tcp_proxy[2] (bind "127.0.0.1:7000"): key "bind": duplicate bind address: '
     "tcp_proxy[1] already binds it"),
    ("[server]\nworkers = 0\n" + LISTENER,
     'proxy.toml:2: server: key "workers": expected an integer between 1 and 1024, got an '
     "integer 0"),
    ("[server]\nworkers = \"4\"\n" + LISTENER, 'key "workers": expected an integer'),
    ("[server]\nthreads = 0\n" + LISTENER, 'key "threads": expected "auto" or an integer'),
    ("[server]\nthreads = \"many\"\n" + LISTENER,
     'key "threads": expected "auto" or an integer between 1 and 256, got a string'),
    ("[server]\nrelay = \"zerocopy\"\n" + LISTENER,
     'proxy.toml:2: server: key "relay": expected one of "auto", "splice", "copy"'),
    ("[server]\ndrain_timeout_s = -1\n" + LISTENER, 'key "drain_timeout_s": expected a number'),
    ("[server]\nworker = 2\n" + LISTENER, 'server: key "worker": unknown key'),
    ("[tcp_proxy]\nbind = \"127.0.0.1:7000\"\nbackends = [\"a:1\"]\n",
     "must be written as [[tcp_proxy]] sections"),
    ("[listen]\nport = 1\n" + LISTENER, 'unknown top-level key or section "listen"'),
    # backends, balancing, failover, health ([[tcp_proxy]] keys)
    (LISTENER.replace('["127.0.0.1:7001"]', '[{ address = "a:1", backup = true }]'),
     'proxy.toml:3: tcp_proxy[1] (bind "127.0.0.1:7000"): key "backends": every backend is a '
     "backup"),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = [{ address = \"a:1\", backup = 1 }]\n",
     "backends[1]: backup: expected true or false, got an integer 1"),
    (LISTENER + 'balance = "leastconn"\n',
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "balance": expected one of '
     '"round_robin", "least_conn", "random_two", "source_hash", got a string'),
    (LISTENER + "retries = -1\n", 'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key '
                                  '"retries": expected an integer between 0 and 1000'),
    (LISTENER + "retries = true\n", 'key "retries": expected an integer'),
    (LISTENER + "connect_timeout_ms = 3000\nconnect_budget_ms = 1000\n",
     'proxy.toml:5: tcp_proxy[1] (bind "127.0.0.1:7000"): key "connect_budget_ms": expected at '
     "least connect_timeout_ms (3000), got 1000"),
    (LISTENER + 'connect_budget_ms = "5s"\n', 'key "connect_budget_ms": expected an integer'),
    (LISTENER + "fall = -1\n", 'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "fall": '
                               "expected an integer between 0 and 1000"),
    (LISTENER + "fail_timeout_ms = 0\n", 'key "fail_timeout_ms": expected an integer number'),
    (LISTENER + "resolve_interval_ms = 10\n",
     'key "resolve_interval_ms": expected an integer number of milliseconds between 100'),
    (LISTENER + "health_check = 5\n",
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "health_check": expected a table'),
    (LISTENER + "\n[tcp_proxy.health_check]\ninterval_ms = 1000\nrize = 2\n",
     'proxy.toml:7: tcp_proxy[1] (bind "127.0.0.1:7000"): key "health_check.rize": unknown key: '
     "expected one of interval_ms, timeout_ms, rise, fall, send, expect"),
    (LISTENER + "\n[tcp_proxy.health_check]\ninterval_ms = 0\n",
     'proxy.toml:6: tcp_proxy[1] (bind "127.0.0.1:7000"): key "health_check.interval_ms": '
     "expected an integer number of milliseconds between 10"),
    (LISTENER + "\n[tcp_proxy.health_check]\ninterval_ms = 500\ntimeout_ms = 800\n",
     'key "health_check.timeout_ms": expected at most interval_ms (500), got 800'),
    (LISTENER + "health_check = { rise = 0 }\n",
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "health_check.rise": expected an '
     "integer number of consecutive passes between 1 and 1000"),
    (LISTENER + "health_check = { fall = 1.5 }\n", 'key "health_check.fall": expected an integer'),
    (LISTENER + 'health_check = { send = "" }\n',
     'key "health_check.send": expected a non-empty string'),
    (LISTENER + "health_check = { expect = 1 }\n",
     'key "health_check.expect": expected a non-empty string'),
    # [admin]
    (LISTENER + '\n[admin]\nbind = "127.0.0.1"\n',
     'proxy.toml:6: admin: key "bind": expected "host:port", got \'127.0.0.1\''),
    (LISTENER + '\n[admin]\nbind = "127.0.0.1:70000"\n',
     'proxy.toml:6: admin: key "bind": expected a port between 0 and 65535'),
    (LISTENER + "\n[admin]\nbind = 9901\n",
     'proxy.toml:6: admin: key "bind": expected a "host:port" string, got an integer 9901'),
    (LISTENER + '\n[admin]\nbnid = "127.0.0.1:9901"\n',
     'proxy.toml:6: admin: key "bnid": unknown key: expected one of bind'),
    ('admin = 5\n' + LISTENER, 'proxy.toml: admin: expected an [admin] table'),
    ("[[tcp_proxy]]\nbind = \"127.0.0.1:7000\"\nbackends = ["
     + ", ".join(f'"host{i}:1"' for i in range(257)) + "]\n",
     "proxy.toml: too many backends: they need 16448 address slots"),
]


def _backend(address: str) -> str:
    return f'[[tcp_proxy]]\nbind = "127.0.0.1:7000"\nbackends = ["{address}"]\n'


# Names getaddrinfo would refuse (its IDNA step raises UnicodeError) or misread.
BAD_NAMES = [
    ("db..local:1", "empty label"),
    (".db:1", "empty label"),
    ("db.:1", "empty label"),
    ("a" * 64 + ".local:1", "is 64 characters, at most 63"),
    (".".join(["a" * 60] * 5) + ":1", "at most 253 characters, this one has 304"),
    ("-db.local:1", "label '-db'"),
    ("db-.local:1", "label 'db-'"),
    ("db!.local:1", "expected a hostname or IP address"),
    ("10.1:1", "not a valid IPv4 address"),
    ("999.1.1.1:1", "not a valid IPv4 address"),
    ("caf\u00e9.local:1", "label"),
]
BAD += [(_backend(address), expected) for address, expected in BAD_NAMES]
BAD += [
    (_backend("[fe80::1%nosuchif0]:80"),
     'proxy.toml:3: tcp_proxy[1] (bind "127.0.0.1:7000"): key "backends": backends[1]: '
     "[fe80::1%nosuchif0]:80: scope id 'nosuchif0' names no network interface"),
    (_backend("[fe80::1%99999]:80"), "scope id '99999' names no network interface"),
    ('[[tcp_proxy]]\nbind = "[fe80::1%nosuchif0]:80"\nbackends = ["a:1"]\n',
     'proxy.toml:2: tcp_proxy[1] (bind "[fe80::1%nosuchif0]:80"): key "bind": '
     "[fe80::1%nosuchif0]:80: scope id"),
    ('[[tcp_proxy]]\nbind = "127.0.0.1:7000"\n'
     'backends = [{ address = "[fe80::1%nosuchif0]:80" }]\n',
     "backends[1]: address: [fe80::1%nosuchif0]:80: scope id"),
]
# Every *_s key: finite, not a boolean, within its documented range.
for _key, _low in (("drain_timeout_s", "0"), ("worker_timeout_s", "5")):
    for _value in ("nan", "inf", "-inf", "true", "-1", "86401", '"30"'):
        BAD.append((f"[server]\n{_key} = {_value}\n" + LISTENER,
                    f'proxy.toml:2: server: key "{_key}": expected a number of seconds '
                    f"between {_low} and 86400"))
BAD += [("[server]\nworker_timeout_s = 1\n" + LISTENER,
         'key "worker_timeout_s": expected a number of seconds between 5 and 86400, '
         "got an integer 1"),
        ("[server]\nworker_timeout_s = 4.9\n" + LISTENER, "between 5 and 86400"),
        ("[server]\ndrain_timeout_s = nan\n" + LISTENER, "got a number nan")]
# Every *_ms key (and the counts): integers only, so nan/inf/booleans fail too.
for _key in ("connect_timeout_ms", "connect_budget_ms", "fail_timeout_ms",
             "resolve_interval_ms", "retries", "fall"):
    for _value in ("nan", "inf", "true", "1.5"):
        BAD.append((LISTENER + f"{_key} = {_value}\n", f'key "{_key}": expected an integer'))
for _key in ("interval_ms", "timeout_ms", "rise", "fall"):
    for _value in ("nan", "inf", "false"):
        BAD.append((LISTENER + f"health_check = {{ {_key} = {_value} }}\n",
                    f'key "health_check.{_key}": expected an integer'))


@pytest.mark.parametrize("text, expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_file_names_file_line_section_key(text, expected):
    with pytest.raises(ConfigError) as raised:
        config.load_text(text, source="proxy.toml")
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)  # one line, fit for a log


def test_admin_section_is_off_unless_configured_and_cli_overrides_it():
    assert config.load_text(LISTENER).admin.bind is None
    assert config.load_text(LISTENER + "[admin]\n").admin.bind is None
    loaded = config.load_text(LISTENER + '[admin]\nbind = "0.0.0.0:9901"\n')
    assert loaded.admin.bind == Endpoint("0.0.0.0", 9901)
    assert config.with_admin(loaded, "[::1]:0").admin.bind == Endpoint("::1", 0)
    assert config.with_admin(loaded, None) is loaded
    with pytest.raises(ConfigError, match='^command line: admin: key "bind": expected'):
        config.with_admin(loaded, "localhost")


def test_second_section_error_points_at_its_line():
    text = LISTENER + '\n[[tcp_proxy]]\nbind = "127.0.0.1:7002"\nbackends = []\n'
    expected = r'^proxy.toml:7: tcp_proxy\[2\] \(bind "127.0.0.1:7002"\)'
    with pytest.raises(ConfigError, match=expected):
        config.load_text(text, source="proxy.toml")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        config.load_file(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("text, endpoint", [
    ("db:5432", Endpoint("db", 5432)),
    ("10.1.2.3:1", Endpoint("10.1.2.3", 1)),
    ("[::1]:6379", Endpoint("::1", 6379)),
    ("[fe80::1%eth0]:22", Endpoint("fe80::1%eth0", 22)),
    ("[fe80::1%br-1a2b.10]:22", Endpoint("fe80::1%br-1a2b.10", 22)),  # real interface names
    ("my_db.svc-1.cluster.local:5432", Endpoint("my_db.svc-1.cluster.local", 5432)),
    ("a" * 63 + ".b:1", Endpoint("a" * 63 + ".b", 1)),
    (".".join(["a" * 62] * 4) + ".b:1", Endpoint(".".join(["a" * 62] * 4) + ".b", 1)),
    ("*:80", Endpoint("0.0.0.0", 80)),
])
def test_parse_endpoint(text, endpoint):
    assert config.parse_endpoint(text) == endpoint


def test_command_line_arguments_are_validated_like_a_file():
    loaded = config.from_arguments(["127.0.0.1:6380"], ["127.0.0.1:6379", "127.0.0.1:6381"],
                                   connect_timeout_ms=250, workers=3)
    assert loaded.server.workers == 3
    assert [str(b.address) for b in loaded.listeners[0].backends] == ["127.0.0.1:6379",
                                                                     "127.0.0.1:6381"]
    with pytest.raises(ConfigError, match='command line: tcp_proxy\\[1\\] .*key "backends"'):
        config.from_arguments(["127.0.0.1:6380"], ["nope"])
    with pytest.raises(ConfigError, match='server: key "workers"'):
        config.with_overrides(loaded, workers=0)


def test_good_numbers_and_addresses_at_the_edges_of_their_ranges():
    loaded = config.load_text("[server]\ndrain_timeout_s = 0\nworker_timeout_s = 5\n"
                              + _backend("[fe80::1%lo]:80"))
    assert (loaded.server.drain_timeout_s, loaded.server.worker_timeout_s) == (0.0, 5.0)
    assert config.numeric_address(loaded.listeners[0].backends[0].address) == \
        (socket.AF_INET6, ("fe80::1", 80, 0, socket.if_nametoindex("lo")))
    assert config.load_text("[server]\nworker_timeout_s = 86400\n" + LISTENER) \
        .server.worker_timeout_s == 86400.0


def test_every_valid_name_is_one_getaddrinfo_can_encode():
    """What passes the name check never makes the resolver raise UnicodeError."""
    for address, _ in BAD_NAMES:
        host = address.rsplit(":", 1)[0]
        assert config.hostname_problem(host)
    for host in ("db", "db-1.local", "a" * 63, ".".join(["a" * 62] * 4) + ".b", "x_y.z",
                 "10.0.0.1", "localhost"):
        assert config.hostname_problem(host) == ""
        host.encode("idna")  # what getaddrinfo does first; raises on a bad label


def test_buffer_budget_and_keepalive_parse_with_documented_defaults():
    from prefork_proxy.config import Keepalive

    loaded = config.load_text(LISTENER)
    assert loaded.server.buffer_budget_mb == config.DEFAULT_BUFFER_BUDGET_MB == 64
    assert loaded.listeners[0].tcp_keepalive is None  # off unless asked
    loaded = config.load_text("[server]\nbuffer_budget_mb = 8\n" + LISTENER
                              + "tcp_keepalive = true\n")
    assert loaded.server.buffer_budget_mb == 8
    assert loaded.listeners[0].tcp_keepalive == Keepalive()  # kernel timings
    loaded = config.load_text(LISTENER + "tcp_keepalive = { idle_s = 60, count = 4 }\n")
    assert loaded.listeners[0].tcp_keepalive == Keepalive(idle_s=60, count=4)
    assert config.load_text(LISTENER + "tcp_keepalive = false\n").listeners[0] \
        .tcp_keepalive is None


BAD_BUDGET_KEEPALIVE = [
    ("[server]\nbuffer_budget_mb = 0\n" + LISTENER,
     'proxy.toml:2: server: key "buffer_budget_mb": expected an integer number of MiB between 1 '
     "and 65536, got an integer 0"),
    ("[server]\nbuffer_budget_mb = 1.5\n" + LISTENER, 'key "buffer_budget_mb": expected an'),
    ("[server]\nbuffer_budget_mb = true\n" + LISTENER, 'key "buffer_budget_mb": expected an'),
    (LISTENER + 'tcp_keepalive = "yes"\n',
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "tcp_keepalive": expected true, '
     "false or a table"),
    (LISTENER + "tcp_keepalive = { idle = 60 }\n",
     'proxy.toml:4: tcp_proxy[1] (bind "127.0.0.1:7000"): key "tcp_keepalive": unknown key '
     '"idle": expected one of idle_s, interval_s, count'),
    (LISTENER + "tcp_keepalive = { idle_s = 0 }\n",
     'key "tcp_keepalive": idle_s: expected an integer between 1 and 32767, got an integer 0'),
    (LISTENER + "tcp_keepalive = { interval_s = 40000 }\n",
     'key "tcp_keepalive": interval_s: expected an integer between 1 and 32767'),
    (LISTENER + "tcp_keepalive = { count = 128 }\n",
     'key "tcp_keepalive": count: expected an integer between 1 and 127'),
]


@pytest.mark.parametrize("text, expected", BAD_BUDGET_KEEPALIVE,
                         ids=[b[1][:40] for b in BAD_BUDGET_KEEPALIVE])
def test_bad_budget_or_keepalive_names_file_line_section_key(text, expected):
    with pytest.raises(ConfigError) as raised:
        config.load_text(text, source="proxy.toml")
    assert expected in str(raised.value)
