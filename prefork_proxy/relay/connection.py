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

    Byte counters (exact, as the bytes move; read them on the loop's thread,
    e.g. an idle sweep comparing them between two looks):

    - ``client_in``: bytes received from the client (``admitted``, read by the
      pre-connect phase, plus the upstream direction's ``nread``);
    - ``client_out``: bytes sent to the client (downstream ``nwritten``);
    - ``backend_out``: bytes sent to the backend (upstream ``nwritten``: a
      PROXY header or a verdict's prefix included, a consumed PROXY header not);
    - ``backend_in``: bytes received from the backend (downstream ``nread``).

    They are properties over the two directions, which count with one
    attribute add per system call (``Direction``); a connection still
    admitting or connecting has only ``admitted``.  ``published_in``/
    ``published_out``: how much of ``client_in``/``client_out`` the loop has
    added to its shared counters so far (``RelayLoop._publish``).  ``started`` is the
    monotonic time it was taken in by its loop (about its accept);
    ``listener_slot``/``base`` say whose shared counters its bytes go to.
    ``attempts``/``tried``/``fail_term``/``refusal`` are what the access log's
    record (``RelayLoop._record``) says about the connect phase and a refusal.
    """

    __slots__ = ("client", "backend", "client_fd", "backend_fd", "targets", "target",
                 "timeout_s", "deadline", "upstream", "downstream", "client_mask",
                 "backend_mask", "peer", "closed", "options", "handler", "admission",
                 "choose", "prefix", "waiting", "listener_slot", "base", "started",
                 "admitted", "published_in", "published_out", "attempt_at", "connect_s",
                 "attempts", "tried", "fail_term", "refusal", "idle_s")

    def __init__(self, client: StreamSocket, targets: Optional[Iterator[Target]],
                 timeout_s: float, peer: str, options: SocketOptions = (),
                 admission: Optional[Admission] = None,
                 choose: Optional[Chooser] = None, listener_slot: int = 0,
                 idle_s: float = 0.0) -> None:
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
        self.listener_slot = listener_slot
        self.base = 0  # its listener's first cell in the loop's stats (set by the loop)
        self.started = 0.0
        self.admitted = 0  # bytes the pre-connect phase read from the client
        # How much of client_in/client_out the loop has added to its shared counters.
        self.published_in = self.published_out = 0
        self.attempt_at = 0.0  # monotonic time of the last connect() called (0.0 once connected)
        # How long the backend took to connect (-1: not connected); 0.0 once
        # connected when the loop has no access log, the only reader of the time.
        self.connect_s = -1.0
        # For the access log (set by the connect phase and ``_report_outcome``):
        self.attempts = 0  # connect attempts made
        self.tried: Optional[str] = None  # the backends tried, in order, "a,b"
        self.fail_term = "SC"  # how the last attempt failed: SC refused, sC timed out
        self.refusal: Optional[Any] = None  # the admission's (or queue's) Reject, if refused
        # The idle timeout (0.0: off); what its sweep saw last is the sweep's
        # (``idle.IdleSweep.members``), not carried by every connection.
        self.idle_s = idle_s

    @property
    def client_in(self) -> int:
        up = self.upstream
        return self.admitted + (up.nread if up is not None else 0)

    @property
    def client_out(self) -> int:
        down = self.downstream
        return down.nwritten if down is not None else 0

    @property
    def backend_out(self) -> int:
        up = self.upstream
        return up.nwritten if up is not None else 0

    @property
    def backend_in(self) -> int:
        down = self.downstream
        return down.nread if down is not None else 0
