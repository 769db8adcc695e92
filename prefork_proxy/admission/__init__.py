"""The pre-connect phase: what happens between accept and the first backend connect.

Relay-independent and pure (no sockets, no threads, no clock but the one read
at ``Admission.start``): the relay feeds it addresses and bytes and does what
the verdict says.  Modules:

- ``pipeline``: ``compile_pipeline`` / ``Pipeline`` (one per listener and
  config; None when the listener has no admission keys) and ``Admission``
  (one per connection; the relay's whole interface is in its docstring).
- ``steps``: ``ProxyHeaderStep``, ``AccessStep``, ``SourceLimitStep``, ``SniStep``.
- ``verdicts``: ``NeedMore`` / ``Accept`` / ``Reject`` / ``Wait`` and the status/term/reason table.
- ``send_proxy``: the PROXY header for a backend, and the health check's.

Imports the rule owners (``acl``, ``limits``, ``proxy_protocol``,
``client_hello``, ``sni_routes``) and nothing of the relay, worker, master or config.
"""

from .pipeline import READ_SIZE, Admission, Pipeline, compile_pipeline
from .send_proxy import health_check_header, proxy_header
from .steps import AccessStep, ProxyHeaderStep, SniStep, SourceLimitStep
from .verdicts import REASONS, TERMS, Accept, NeedMore, Reject, Verdict, Wait

__all__ = [
    "READ_SIZE", "REASONS", "TERMS", "Accept", "AccessStep", "Admission", "NeedMore",
    "Pipeline", "ProxyHeaderStep", "Reject", "SniStep", "SourceLimitStep", "Verdict", "Wait",
    "compile_pipeline", "health_check_header", "proxy_header",
]
