"""The hand-over protocol (handover.py) and ListenerSet adoption, driven in this process."""

from __future__ import annotations

import json
import os
import socket

from prefork_proxy import config, handover
from prefork_proxy.listeners import ListenerSet


def _listeners(*binds: str):
    text = "".join(f'[[tcp_proxy]]\nbind = "{b}"\nbackends = ["127.0.0.1:9"]\n' for b in binds)
    return config.load_text(text).listeners


def _plain_listener() -> socket.socket:
    """A listening socket bound WITHOUT SO_REUSEPORT: a probe of its address fails."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_listener_names_round_trip_every_key_shape():
    for key in [(socket.AF_INET, "127.0.0.1", 6380), (socket.AF_INET6, "::1", 6380, 0),
                ("port 0", 2, socket.AF_INET, "127.0.0.1")]:
        name = handover.listener_name(key)
        assert name.startswith("listener:")
        back = handover.listener_key(name)
        assert back == key and hash(back) == hash(key)  # AF_INET == 2 as a dict key
    assert handover.listener_key("admin") is None
    assert handover.listener_key("listener:not json") is None


def test_an_adopted_socket_is_used_for_its_address_and_not_probed():
    """The probe binds without SO_REUSEPORT and would call our own inherited socket
    "another process"; an adopted key skips it and is never re-bound."""
    inherited = _plain_listener()
    port = inherited.getsockname()[1]
    listeners = ListenerSet()
    listeners.adopt({(socket.AF_INET, "127.0.0.1", port): inherited})
    try:
        [sock] = listeners.open(_listeners(f"localhost:{port}"))
        assert sock is inherited
        assert listeners.close_unadopted() == []
    finally:
        listeners.close()


def test_systemd_sockets_are_adopted_by_address_and_the_rest_reported():
    used, unused = _plain_listener(), _plain_listener()
    port, unused_port = used.getsockname()[1], unused.getsockname()[1]
    listeners = ListenerSet()
    listeners.adopt_by_address([used, unused])
    try:
        [sock] = listeners.open(_listeners(f"127.0.0.1:{port}"))
        assert sock is used
        assert listeners.close_unadopted() == [f"127.0.0.1:{unused_port}"]
        assert unused.fileno() == -1
    finally:
        listeners.close()


def test_take_inherited_adopts_listening_sockets_only_and_clears_cloexec_again():
    listening = _plain_listener()
    connected_a, connected_b = socket.socketpair()
    channel_ours, channel_theirs = socket.socketpair()
    for sock in (listening, connected_a, channel_theirs):
        sock.set_inheritable(True)  # as after exec
    key = (socket.AF_INET, "127.0.0.1", listening.getsockname()[1])
    fds = {handover.listener_name(key): listening.detach(),
           handover.listener_name(("port 0", 0, 2, "127.0.0.1")): connected_a.fileno(),
           "admin": -5}
    env = {handover.FDS_ENV: json.dumps(fds), handover.CHANNEL_ENV: str(channel_theirs.detach()),
           handover.FROM_ENV: "4242"}
    inherited = handover.take_inherited(env)
    try:
        found = inherited.listeners()
        assert list(found) == [key]  # the connected socket and the bad fd were skipped
        assert not found[key].get_inheritable()
        assert inherited.channel is not None and not inherited.channel.get_inheritable()
        assert inherited.from_pid == 4242
        assert connected_a.fileno() >= 0  # skipped, not closed: it was never ours
    finally:
        for sock in list(found.values()) + [inherited.channel, connected_a, connected_b,
                                            channel_ours]:
            if sock is not None:
                sock.close()


def test_no_variables_nothing_inherited():
    inherited = handover.take_inherited({})
    assert inherited.sockets == {} and inherited.channel is None
    assert handover.take_systemd_sockets({"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1)}
                                         ) == []
