"""The admin endpoint: a small HTTP/1.x server beside the relay, for metrics and health.

- ``httphead``: a pure parser of an HTTP/1.x request head over bytes (no I/O).
- ``server``: ``AdminServer``, one selector loop in its own thread, serving a
  routing table of callables given by the caller (the master plugs ``/metrics``,
  ``/live``, ``/ready``, ``/status``); ``is_loopback`` for the bind warning.
- ``exposition``: renders a ``prometheus_client`` registry into a response body.

Nothing here touches relay threads or shared memory: the caller owns the data.
"""
