"""prefork_proxy_backend_admin_state: the operator's drain/disable/enable, in /metrics.

``backend_up`` says what health checks and failures say and leaves the
operator's state out; this one-hot gauge shows it.  The real proxy, its
control socket (``prefork-proxy backend``) and its admin port.
"""

from __future__ import annotations

import textwrap

from support import wait_for, write_config
from test_admin import admin_port
from test_backend_control import _act, _booted
from test_metrics import scrape, value


def test_admin_state_is_one_hot_and_follows_the_commands(backend_factory, proxy_factory,
                                                          tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    pidfile = tmp_path / "proxy.pid"
    path = write_config(tmp_path / "proxy.toml", textwrap.dedent(f"""
        [server]
        workers = 2
        pidfile = "{pidfile}"

        [admin]
        bind = "127.0.0.1:0"

        [[tcp_proxy]]
        name = "web"
        bind = "127.0.0.1:0"
        backends = ["{a.address}", "{b.address}"]
    """))
    proxy = proxy_factory("start", "--config", str(path))
    _booted(proxy)
    port = admin_port(proxy)

    def states(backend: str) -> dict:
        samples = scrape(port)
        return {state: value(samples, "prefork_proxy_backend_admin_state", listener="web",
                             backend=backend, state=state)
                for state in ("ready", "drain", "disabled")}

    wait_for(lambda: ("prefork_proxy_backend_admin_state",
                      (("backend", b.address), ("listener", "web"), ("state", "ready")))
             in scrape(port), 10, message="the admin state in /metrics")
    assert states(b.address) == {"ready": 1, "drain": 0, "disabled": 0}
    for action, state in (("drain", "drain"), ("disable", "disabled"), ("enable", "ready")):
        _act(pidfile, b.address, action)
        expected = {name: int(name == state) for name in ("ready", "drain", "disabled")}
        wait_for(lambda expected=expected: states(b.address) == expected, 10,
                 message=f"{b.address} {state}")
        assert states(a.address) == {"ready": 1, "drain": 0, "disabled": 0}
        # backend_up is health only: B still answers, so a drained backend does
        # not fire the "backend down" alert.
        assert value(scrape(port), "prefork_proxy_backend_up", listener="web",
                     backend=b.address) == 1
