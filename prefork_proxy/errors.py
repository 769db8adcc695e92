"""Exception types and process exit codes shared by every module.

Imports nothing from the package, so any module may import it.
"""

from __future__ import annotations

#: Process exit codes of ``prefork-proxy``: documented in README.md, relied on by tests.
EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure: a listener could not be bound, a worker could not boot
EXIT_CONFIG = 2  # the configuration (file or command line) is invalid


class ProxyError(Exception):
    """Base class of the errors prefork-proxy reports to an operator."""


class ConfigError(ProxyError):
    """The configuration is invalid.

    ``str()`` is a single line naming the file, the line where it is known,
    the section and key, and what was expected, e.g.::

        proxy.toml:7: tcp_proxy[1] (bind "0.0.0.0:5432"): key "backends": expected ...
    """


class BindError(ProxyError):
    """A listener could not be bound (address in use, permission denied, ...)."""
