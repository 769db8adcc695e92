"""The record of one relayed connection: ``Connection``.

Owns no behaviour: the fields every phase reads and writes (sockets, their
epoll masks, the targets left to try, the armed deadline, the two
directions, and ``handler``: who hears the next readiness event).  Made by
``RelayLoop._take_inbox`` and touched only by that loop's thread, from its
admission (if any) or first connect attempt until both sockets are closed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from .contract import Admission, Chooser, SocketOptions, StreamSocket, Target
from .direction import Direction

#: ``handler(conn, fd, events)``: what one readiness event of a connection's socket runs.
Handler = Callable[["Connection", int, int], None]


class Connection:
    """A client and its backend, owned by one ``RelayLoop``.

    ``handler`` is the phase's event handler (connecting, then relaying): the
    loop calls it for every readiness event of either socket, so the loop
    itself knows no phases.  ``client_mask``/``backend_mask`` are the epoll
    events registered for each socket (0: not registered).  ``deadline`` is
    the one timer armed for it on the loop's ``TimerHeap`` (0.0: none).
    ``admission``, when set, is the connection's pre-connect phase (see
    ``admit``): it is "accepted, admitting" until the verdict, then connects.
    ``targets`` is dropped once connected: the balancer's generators behind
    it are only needed to fail over, and an idle connection should hold as
    little as possible.  ``waiting`` is set while it waits in a backend queue
    for a slot (``queued.Waiting``).
    """

    __slots__ = ("client", "backend", "client_fd", "backend_fd", "targets", "target",
                 "timeout_s", "deadline", "upstream", "downstream", "client_mask",
                 "backend_mask", "peer", "closed", "options", "handler", "admission",
                 "choose", "prefix", "waiting")

    def __init__(self, client: StreamSocket, targets: Optional[Iterator[Target]],
                 timeout_s: float, peer: str, options: SocketOptions = (),
                 admission: Optional[Admission] = None,
                 choose: Optional[Chooser] = None) -> None:
        self.client = client
        self.options = options  # set on each backend socket before it connects
        self.client_fd = client.fileno()
        self.backend: Optional[StreamSocket] = None
        self.backend_fd = -1
        self.targets = targets
        self.target: Optional[Target] = None
        self.timeout_s = timeout_s
        self.deadline = 0.0
        self.upstream: Optional[Direction] = None  # client -> backend
        self.downstream: Optional[Direction] = None  # backend -> client
        self.client_mask = 0
        self.backend_mask = 0
        self.peer = peer
        self.closed = False
        self.handler: Optional[Handler] = None
        # The pre-connect phase (``admit``), None for a listener without one.
        self.admission = admission
        self.choose = choose  # dropped once it has chosen the targets
        self.prefix = b""  # the verdict's forward_prefix: the backend gets it first
        self.waiting: Optional[Any] = None  # its place in a backend queue (``queued``)
