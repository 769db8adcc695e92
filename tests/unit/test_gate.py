"""The admission glue (prefork_proxy/gate.py): which listeners get a pipeline, what ``choose``
gives the relay (the client address from the verdict, per-backend PROXY headers), and the
master's shared limits.  Real config, real SharedState and Balancer; no sockets."""

from __future__ import annotations

from prefork_proxy import config, gate
from prefork_proxy.admission import Accept, NeedMore, proxy_header
from prefork_proxy.balancer import Balancer
from prefork_proxy.shared import SharedState

CLIENT, LOCAL = ("198.51.100.7", 40000), ("127.0.0.1", 8443)


def _setup(keys: str, backends: str = '["127.0.0.1:7001", "127.0.0.1:7002"]'):
    loaded = config.load_text(f'[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = {backends}\n'
                              + keys)
    listener = loaded.listeners[0]
    limits = gate.connection_limits(loaded)
    balancer = Balancer(listener, SharedState(loaded), 0)
    return loaded, gate.listener_gate(listener, balancer, limits, 0), limits


def _accept(client=CLIENT) -> Accept:
    return Accept(None, client, LOCAL, b"", 0, None)


def test_a_listener_without_admission_keys_gets_no_gate_and_no_limits():
    loaded, g, limits = _setup("")
    assert g is None and limits is None
    assert not gate.has_admission(loaded.listeners[0])


def test_send_proxy_on_every_backend_puts_one_header_of_the_client_address_on_the_verdict():
    _, g, _ = _setup('send_proxy = "v2"\n')
    assert g is not None
    adm = g.open(("127.0.0.1", 5555), LOCAL)  # send_proxy alone: Accept at once
    assert isinstance(adm.start(), Accept)
    verdict = _accept()
    targets = list(g.choose(verdict))
    assert [t.sockaddr[1] for t in targets] in ([7001, 7002], [7002, 7001])
    # One header for the connection, whichever backend connects; no Target copied.
    assert verdict.send_first == proxy_header("v2", CLIENT, LOCAL)
    assert {getattr(t, "send_prefix", b"") for t in targets} == {b""}


def test_a_backend_key_overrides_the_listener_and_failover_keeps_each_its_own():
    _, g, _ = _setup('balance = "round_robin"\n',
                     '["127.0.0.1:7001", { address = "127.0.0.1:7002", send_proxy = "v1" }]')
    verdict = _accept()
    by_port = {t.sockaddr[1]: t for t in g.choose(verdict)}
    assert by_port[7002].send_prefix == proxy_header("v1", CLIENT, LOCAL)
    assert getattr(by_port[7001], "send_prefix", b"") == b""
    assert verdict.send_first == b""  # backends that differ: each target its own


def test_source_hash_hashes_the_client_address_of_the_verdict_not_the_peer():
    _, g, _ = _setup('balance = "source_hash"\nallow = ["0.0.0.0/0"]\n',
                     '["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003", "127.0.0.1:7004"]')
    firsts = {next(g.choose(_accept((f"203.0.113.{n}", 1)))).sockaddr[1] for n in range(64)}
    assert len(firsts) > 1  # different clients spread...
    for n in range(8):      # ...and one client always lands on the same backend
        client = (f"203.0.113.{n}", n)
        assert len({next(g.choose(_accept(client))).sockaddr for _ in range(5)}) == 1


def test_limits_are_shared_and_sized_from_the_config():
    loaded, g, limits = _setup('max_connections = 100\nmax_connections_per_source = 2\n'
                               'accept_proxy = "v1"\n')
    assert limits is not None and limits.capacity == 100
    assert gate.sources_for(loaded) == 100
    opened = []
    for _ in range(3):
        adm = g.open(("127.0.0.1", 1), LOCAL)
        assert isinstance(adm.start(0.0), NeedMore)
        opened.append(adm.feed(b"PROXY TCP4 192.0.2.9 127.0.0.1 5 6\r\n"))
    assert [type(v).__name__ for v in opened] == ["Accept", "Accept", "Reject"]
    assert opened[0].client_address == ("192.0.2.9", 5)
    assert limits.source_connections(0, "192.0.2.9") == 2


ROUTED = '''[[tcp_proxy]]
bind = "127.0.0.1:0"
backends = ["127.0.0.1:7001"]

[[tcp_proxy.routes]]
server_names = ["a.test"]
backends = ["127.0.0.1:7101", "127.0.0.1:7102"]
send_proxy = "v1"

[[tcp_proxy.routes]]
server_names = ["b.test"]
backends = [{ address = "127.0.0.1:7001", max_connections = 1 }]
'''


def _routed():
    loaded = config.load_text(ROUTED)
    listener = loaded.listeners[0]
    shared = SharedState(loaded)
    limits = gate.connection_limits(loaded)
    routes = [Balancer(pool, shared, 0, 0, limits) for pool in listener.route_pools()]
    g = gate.listener_gate(listener, Balancer(listener, shared, 0, 0, limits), limits, 0,
                           routes)
    return shared, limits, routes, g


def test_each_route_is_a_pool_of_its_own_with_its_own_slots_and_headers():
    shared, _, routes, g = _routed()
    default = [t.sockaddr[1] for t in g.choose(Accept(None, CLIENT, LOCAL, b"", 0))]
    assert default == [7001]
    verdicts = [Accept(0, CLIENT, LOCAL, b"", 0, "a.test") for _ in range(4)]
    firsts = [next(g.choose(verdict)) for verdict in verdicts]
    assert [t.sockaddr[1] for t in firsts] in ([7101, 7102] * 2, [7102, 7101] * 2)
    assert {v.send_first for v in verdicts} == {proxy_header("v1", CLIENT, LOCAL)}
    # 127.0.0.1:7001 is in the default pool and in route 2: two slots, two rotations.
    slots = {pool.route_name or "default": [e.slots for e in entries]
             for _, pool, entries in shared.pools()}
    assert slots["default"] != slots["b.test"]
    assert shared.round_robin(None, 0) is not shared.round_robin(None, 0, routes[0].listener)


def test_a_route_backend_max_connections_gets_the_shared_limits():
    _, limits, routes, g = _routed()
    assert limits is not None  # only a route's backend sets max_connections
    assert routes[1].limits is limits and routes[0].limits is None
    first = list(g.choose(Accept(1, CLIENT, LOCAL, b"", 0, "b.test")))
    assert [t.sockaddr[1] for t in first if t.sockaddr] == [7001]


def _listeners(*keys: str) -> config.Config:
    """A config of one listener per ``keys`` (its extra TOML lines), each on its own port."""
    return config.load_text("".join(
        f'[[tcp_proxy]]\nbind = "127.0.0.1:{port}"\nbackends = ["127.0.0.1:7001"]\n{extra}\n'
        for port, extra in enumerate(keys)))


def test_listeners_without_max_connections_get_an_equal_share_of_the_source_table():
    loaded = _listeners("max_connections_per_source = 5",
                        "max_new_connections_per_source = 50",
                        "max_connections = 300\nmax_connections_per_source = 5",
                        'allow = ["127.0.0.0/8"]')
    capacity = gate.sources_for(loaded)
    assert capacity == gate.MAX_SOURCES
    # Three listeners have a per-source limit: a third each for the two unbounded ones;
    # max_connections bounds the third's live sources; the fourth counts none.
    assert gate.source_shares(loaded, capacity) == {0: capacity // 3, 1: capacity // 3}
    assert gate.source_shares(loaded, 2) == {0: 1, 1: 1}  # never a share of 0 (none)


def test_the_master_gives_each_listener_slot_its_share_and_takes_it_back_on_reload():
    from prefork_proxy.master import Master

    first = _listeners("max_connections_per_source = 5", "max_new_connections_per_source = 50")
    master = Master(first)
    master.shared = SharedState(first)
    master.limits = gate.connection_limits(first)
    assert master.limits is not None
    master._share_sources()
    slots = [master.shared.listener_slot(i) for i in range(2)]
    share = master.limits.capacity // 2
    assert [master.limits.scope_share[s] for s in slots] == [share, share]
    # A reload that bounds the first with max_connections and drops the second.
    second = _listeners("max_connections_per_source = 5\nmax_connections = 10")
    master.shared.reconfigure(second)
    master._share_sources(second)
    assert [master.limits.scope_share[s] for s in slots] == [0, 0]
