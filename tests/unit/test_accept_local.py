"""``accept.fixed_local``: the local address a gated listener's clients share.

A listener bound to one TCP address gives every client that address as its
``getsockname()``, so the gated accept path reuses it instead of one syscall per
client; a wildcard listener's clients differ, so there it must be None.
"""

import socket

import pytest

from prefork_proxy.accept import fixed_local


def _accepted_local(listener: socket.socket, host: str) -> object:
    port = listener.getsockname()[1]
    with socket.create_connection((host, port), timeout=5):  # held open while we look
        accepted, _ = listener.accept()
        with accepted:
            return accepted.getsockname()


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_bound_listener_local_is_each_clients_local(family: int, host: str) -> None:
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
    except OSError as exc:
        pytest.skip(f"no {host}: {exc}")
    with listener:
        listener.listen(4)
        local = fixed_local(listener)
        assert local is not None
        assert local == _accepted_local(listener, host)


def test_wildcard_listener_has_no_fixed_local() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(4)
        assert fixed_local(listener) is None
        # the reason: a client's local address is the one it connected to
        assert _accepted_local(listener, "127.0.0.2")[0] == "127.0.0.2"


def test_unix_listener_has_no_fixed_local(tmp_path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "s"))
        assert fixed_local(listener) is None
