"""Moving bytes between two sockets: the package that owns the relay.

Each worker runs a few ``RelayLoop`` threads; each loop owns an epoll instance
and every connection handed to it, from ``submit`` until both sockets
are closed.  One loop per worker also watches the listeners and lets its
``Acceptor`` (the worker's ``accept.AcceptPolicy``) accept, which hands each client to a loop with
``submit``; after that only the loop's thread touches the connection, so
connections need no locks.  This module knows sockets and addresses, nothing
of the config or of processes: it imports only the standard library,
``splice`` and ``errors`` (tests/unit/test_layering.py keeps it so).

Modules (each says what it owns and which thread calls it):

- ``loop``: ``RelayLoop`` (epoll, fd -> connection -> ``handler``, inbox and
  wake pipe, close-after-batch, the relay phase), ``TimerHeap`` (the loop's
  one timer heap) and ``ListenerWatch`` (watching the listeners for the worker).
- ``admit``: ``Admitter``: the pre-connect phase (feeding a connection's
  admission object, its deadline, reject or accept -> ``choose`` -> connect).
- ``connect``: ``Connector``: non-blocking connect, failover, deadlines.
- ``queued``: ``Queuer``: a connection waiting in a backend queue (a target
  with ``queue``: every backend at its ``max_connections``), woken by
  ``RelayLoop.resume``, refused at its deadline.
- ``direction``: ``Direction.pump``, the fast path; ``choose_mode``.
- ``buffers``: ``PipePool``, ``BufferPool`` and the loop's budget.
- ``connection``: ``Connection``, the record every phase shares.
- ``contract``: what crosses the boundary: ``Target`` and its outcomes,
  ``Acceptor``, ``Admission``/``Chooser``/``OutcomeHook``, ``LoopStatsHooks``
  (the loop's counters: bytes as they move, a close per connection), ``StreamSocket``,
  ``SocketOptions``.

How a connection is served:

0. ``submit(..., admission=adm, choose=f)`` only: the client is "accepted,
   admitting": the loop reads it and feeds ``adm`` until a verdict or its
   deadline; a reject closes it (an RST unless it timed out) and tells the
   loop's ``on_outcome``; an accept gets its targets from ``f(verdict)`` and
   goes on to 1., with the bytes read so far sent to the backend first.
1. ``submit(client, targets, timeout_s)``: the loop connects to the first
   target without blocking, bounded by ``timeout_s``; on refusal or timeout it
   tries the next target, and when none is left it closes the client and logs
   one line naming the backend and the reason.
2. Once connected, two ``Direction``s (client->backend, backend->client) pump
   bytes, starting with whatever the client already sent.  ``choose_mode``
   decides once per process whether bulk streams may be spliced (socket ->
   pipe -> socket inside the kernel); small bursts are always copied with
   ``recv_into``/``send``, and in ``copy`` mode everything is.
3. EOF on one side becomes ``shutdown(SHUT_WR)`` on the other while the other
   direction keeps flowing; when both directions have ended, both sockets are
   closed.  A reset or any other error, on either side or in our own code,
   and the drain deadline, abort both at once: each socket is closed with
   SO_LINGER 0, so each peer hears a reset, never a clean end (``_close``).

Principle (backpressure): a direction reads only when its pipe or buffer is
empty, and while bytes wait for a destination that is not writable it stops
watching the source for reads and watches the destination for writes instead.
So memory per connection is bounded by one pipe or buffer per direction, and
bytes stuck in a pipe never make the loop spin.  Across connections, a loop's
budget (``BufferPool``) caps what all of them hold together: when it is spent,
a direction reads at most a short burst (``SHORT_READ``) at a time, so one
that writes what it reads holds nothing and flows on, and one whose
destination is stuck holds only that burst's remainder, in a small buffer.

Principle (idle connections cost two descriptors): pipes and buffers are lent
from a per-thread pool only while a direction holds bytes, and returned when it
is empty.  10,000 idle connections hold 20,000 socket descriptors and no pipes.
"""


from .admit import Admitter
from .buffers import (
    BUFFER_SIZE,
    DEFAULT_BUDGET,
    PIPE_SIZE,
    POOL_KEEP,
    SHORT_READ,
    SMALL_SIZE,
    BufferPool,
    PipePool,
)
from .connect import Connector, apply_options, keepalive_options
from .connection import Connection
from .contract import (
    CONNECTED,
    FAILED,
    RELEASED,
    Acceptor,
    Admission,
    Chooser,
    LoopStatsHooks,
    OutcomeHook,
    SocketOptions,
    StreamSocket,
    Target,
)
from .direction import (
    BULK_READ,
    DONE,
    ROUNDS_PER_EVENT,
    WANT_READ,
    WANT_WRITE,
    Direction,
    choose_mode,
)
from .loop import IDLE_POLL_S, TIMEOUTS_SLACK, ListenerWatch, RelayLoop, TimerHeap

__all__ = [
    "BUFFER_SIZE", "BULK_READ", "CONNECTED", "DEFAULT_BUDGET", "DONE", "FAILED", "IDLE_POLL_S",
    "PIPE_SIZE", "POOL_KEEP", "RELEASED", "ROUNDS_PER_EVENT", "SHORT_READ", "SMALL_SIZE",
    "TIMEOUTS_SLACK", "WANT_READ", "WANT_WRITE", "Acceptor", "Admission", "Admitter",
    "BufferPool", "Chooser", "Connection", "LoopStatsHooks", "OutcomeHook",
    "Connector", "Direction", "ListenerWatch", "PipePool", "RelayLoop", "SocketOptions",
    "StreamSocket", "Target", "TimerHeap", "apply_options", "choose_mode", "keepalive_options",
]
