"""``[server] watch_config``: the master reloads when the config file's content changes.

Real proxy, real tag backends.  The file is changed the two ways it is in the
field: rewritten in place, and swapped the way Kubernetes updates a mounted
ConfigMap (``proxy.toml -> ..data/proxy.toml``, ``..data -> ..<timestamp>``,
the ``..data`` link replaced atomically by a rename), which a watch on the
file itself would miss.
"""

from __future__ import annotations

import os
import socket
import textwrap
import time
from pathlib import Path

from support import free_port, wait_for


def _toml(backend: str, port: int, *, watch: bool = True) -> str:
    return textwrap.dedent(f"""
        [server]
        workers = 1
        watch_config = {"true" if watch else "false"}

        [[tcp_proxy]]
        bind = "127.0.0.1:{port}"
        backends = ["{backend}"]
    """)



def _tag(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.makefile("rb").readline().decode().strip()


def _only(port: int, tag: str, seconds: float) -> None:
    """Connect in a loop for ``seconds`` (bounded count too): each one must reach ``tag``."""
    deadline = time.monotonic() + seconds
    for _ in range(100_000):
        if time.monotonic() >= deadline:
            return
        assert _tag(port) == tag


def _serves(port: int, tag: str) -> bool:
    return all(_tag(port) == tag for _ in range(3))


def test_rewrite_reloads_and_an_invalid_rewrite_is_logged_once(backend_factory, proxy_factory,
                                                               tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(_toml(a.address, port))
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    assert _tag(port) == "A"

    config.write_text(_toml(b.address, port))  # no SIGHUP: the watch notices
    wait_for(lambda: "generation 2 serves" in proxy.log, 15, message="the watched reload")
    wait_for(lambda: _serves(port, "B"), message="generation 2 to serve B")

    config.write_text(_toml(b.address, port).replace(f'"{b.address}"', '"not an address"'))
    wait_for(lambda: "reload failed, still serving generation 2" in proxy.log, 15,
             message="the invalid rewrite to be logged")
    # For three poll intervals, every connection still reaches B (the old config),
    # and the same invalid content is not tried again.
    _only(port, "B", 3.5)
    assert proxy.log.count("changed; reloading") == 2, proxy.log
    assert proxy.log.count("reload failed") == 1, proxy.log

    config.write_text(_toml(a.address, port))  # fixed: the next change reloads again
    wait_for(lambda: "generation 3 serves" in proxy.log, 15, message="the fixed reload")
    wait_for(lambda: _serves(port, "A"), message="generation 3 to serve A")


def _swap_configmap(mount: Path, name: str, text: str, version: int) -> None:
    """Update ``mount`` as the kubelet does: a new dir, then ``..data`` renamed over."""
    target = mount / f"..2026_{version:04d}"
    target.mkdir()
    (target / name).write_text(text)
    link = mount / "..data_tmp"
    os.symlink(target.name, link)
    os.rename(link, mount / "..data")  # atomic: readers see the old or the new dir


def test_configmap_symlink_swap_reloads(backend_factory, proxy_factory, tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port = free_port()
    mount = tmp_path / "config"
    mount.mkdir()
    _swap_configmap(mount, "proxy.toml", _toml(a.address, port), 1)
    os.symlink("..data/proxy.toml", mount / "proxy.toml")
    proxy = proxy_factory("start", "--config", str(mount / "proxy.toml"))
    proxy.wait_workers(1)
    assert _tag(port) == "A"

    _swap_configmap(mount, "proxy.toml", _toml(b.address, port), 2)
    wait_for(lambda: "generation 2 serves" in proxy.log, 15, message="the swap's reload")
    wait_for(lambda: _serves(port, "B"), message="generation 2 to serve B")


def test_without_watch_config_a_rewrite_changes_nothing(backend_factory, proxy_factory,
                                                        tmp_path):
    a, b = backend_factory("tag", "A"), backend_factory("tag", "B")
    port = free_port()
    config = tmp_path / "proxy.toml"
    config.write_text(_toml(a.address, port, watch=False))
    proxy = proxy_factory("start", "--config", str(config))
    proxy.wait_workers(1)
    config.write_text(_toml(b.address, port, watch=False))
    _only(port, "A", 2.5)  # more than two poll intervals
    assert "watch_config" not in proxy.log
