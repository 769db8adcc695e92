"""The admin endpoint: a small HTTP/1.x server beside the relay, for metrics and health.

- ``process``: ``AdminEndpoint``, the master's handle (binds the port before any
  fork, forks and restarts the ``prefork-proxy: admin`` process), and that process;
- ``page``: ``StatusPage``, the shared memory the master writes for it (loop
  heartbeat, stopping flag, the status model as JSON);
- ``endpoints``: the routes and ``ModelCollector`` (what ``/metrics`` reads);
- ``httphead``: a pure parser of an HTTP/1.x request head over bytes (no I/O).
- ``server``: ``AdminServer``, one selector loop in its own thread, serving a
  routing table of callables given by the caller (the master plugs ``/metrics``,
  ``/live``, ``/ready``, ``/status``); ``is_loopback`` for the bind warning.
- ``exposition``: renders a ``prometheus_client`` registry into a response body.

Nothing here touches relay threads, and the admin process writes no shared memory:
it reads what the master and the workers publish.
"""
