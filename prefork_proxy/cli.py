"""The ``prefork-proxy`` command: ``start``, ``check``, ``reload``, ``upgrade``, ``stop``,
``status``,
``backend`` (runtime drain / disable / enable through the control socket, ``backend_control``).

``--version`` prints the installed version.  ``start`` runs in the process
that becomes the master; the other commands are short-lived and talk to a
running master through its pidfile (``control``).
Owns argument parsing, logging setup and exit codes (``errors.EXIT_*``): 0
success, 1 a runtime failure (a listener cannot be bound, no master is
running), 2 an invalid configuration or command line.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any, List, Optional, Sequence, Union

from prefork_proxy import __version__, backend_control, control, logsetup
from prefork_proxy import config as config_module
from prefork_proxy import status as status_model
from prefork_proxy.config import RELAY_MODES, Config
from prefork_proxy.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, ProxyError


def _threads_argument(text: str) -> object:
    """``--threads``: "auto" or a count (the config validates the range)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected \"auto\" or a number, got {text!r}") from None


DISTRIBUTION = "prefork-proxy"


def installed_version() -> str:
    """The version in the installed package's metadata, else the source's ``__version__``.

    The metadata is what pip, ``pip show`` and a wheel's name say; both come from
    ``__version__`` at build time (pyproject.toml: ``dynamic = ["version"]``).  The
    fallback covers running from a source tree that was never installed.
    """
    from importlib import metadata  # imported late: only --version needs it

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return __version__


class _VersionAction(argparse.Action):
    """``--version``: print ``prefork-proxy X.Y.Z`` and exit 0, looking the version up only then."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Union[str, Sequence[Any], None],
                 option_string: Optional[str] = None) -> None:
        print(f"{parser.prog} {installed_version()}")
        parser.exit(EXIT_OK)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefork-proxy",
        description="A Layer-4 TCP reverse proxy: a master process and prefork workers "
                    "relaying raw bytes to a pool of backends.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the installed version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = commands.add_parser(
        "start", help="serve, from a config file or from --bind/--backend",
        description="Serve until SIGTERM (graceful) or SIGINT (fast). Give either --config "
                    "or --bind with one or more --backend.")
    start.add_argument("--config", "-c", metavar="FILE", help="TOML config file")
    start.add_argument("--bind", "-b", action="append", default=[], metavar="HOST:PORT",
                       help="listen address (repeatable), used without --config")
    start.add_argument("--backend", action="append", default=[], metavar="HOST:PORT",
                       help="backend address (repeatable), used with --bind")
    start.add_argument("--connect-timeout-ms", type=int,
                       default=config_module.DEFAULT_CONNECT_TIMEOUT_MS, metavar="MS",
                       help="backend connect timeout with --bind (default %(default)s)")
    start.add_argument("--workers", "-w", type=int, metavar="N",
                       help="worker processes (default: [server] workers, else CPU count)")
    start.add_argument("--threads", type=_threads_argument, metavar="N|auto",
                       help="relay threads per worker (default auto: 1 under a GIL)")
    start.add_argument("--relay", choices=RELAY_MODES, help="how bytes move (default auto)")
    start.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])
    start.add_argument("--log-file", metavar="FILE",
                       help="append logs to FILE instead of stderr (SIGUSR1 reopens it)")
    start.add_argument("--pidfile", metavar="FILE",
                       help="write the master's pid here (for reload/stop/status)")
    start.add_argument("--admin", metavar="HOST:PORT",
                       help="serve the HTTP admin endpoint (/live, /ready, /status, /metrics) "
                            "here; overrides [admin] bind")

    check = commands.add_parser("check", help="validate a config file without binding anything",
                                description="Exit 0 with a summary, or 2 with the error.")
    check.add_argument("--config", "-c", metavar="FILE", required=True, help="TOML config file")

    for name, text in (("reload", "reload the config of a running proxy (SIGHUP)"),
                       ("upgrade", "start the program on disk in place of the running master "
                                   "(SIGUSR2) and wait until it serves or has failed"),
                       ("stop", "stop a running proxy gracefully (SIGTERM) and wait"),
                       ("status", "show the master, its generation and its workers; "
                                  "exit 1 if it is stuck or no worker serves"),
                       ("backend", "list backends and their state (`backend list`), or take "
                                   "one out of rotation or back: `backend LISTENER [ROUTE] "
                                   "BACKEND drain|disable|enable` (through the master's control "
                                   "socket beside the pidfile)")):
        command = commands.add_parser(name, help=text, description=text)
        where = command.add_mutually_exclusive_group(required=True)
        where.add_argument("--pidfile", metavar="FILE", help="the running master's pidfile")
        where.add_argument("--config", "-c", metavar="FILE",
                           help="the config file whose [server] pidfile names it")
        if name == "backend":
            command.add_argument("words", nargs="+",
                                 metavar="list | LISTENER [ROUTE] BACKEND ACTION",
                                 help="`list`, or a listener (name or bind), the name of one "
                                      "of its SNI routes (for a route's backend), a backend "
                                      "(as configured) and drain, disable or enable")
        if name == "upgrade":
            command.add_argument("--timeout", type=float, default=90.0, metavar="SECONDS",
                                 help="how long to wait for the new master to be ready")
        if name == "stop":
            command.add_argument("--fast", action="store_true",
                                 help="close connections at once (SIGINT) instead of draining")
            command.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                                 help="how long to wait for the master to exit")
    return parser


def configure_logging(level: str, log_file: Optional[str] = None) -> None:
    logsetup.configure(level, log_file)


def config_from_start_args(args: argparse.Namespace) -> Config:
    """The config that ``start`` serves: a file plus overrides, or --bind/--backend."""
    if args.config:
        if args.bind or args.backend:
            raise ConfigError("command line: give either --config or --bind/--backend, not both")
        loaded = config_module.load_file(args.config)
        loaded = config_module.with_overrides(loaded, workers=args.workers,
                                              threads=args.threads, relay=args.relay,
                                              pidfile=args.pidfile, log_file=args.log_file)
        return config_module.with_admin(loaded, args.admin)
    if not args.bind or not args.backend:
        raise ConfigError("command line: expected --config FILE, or --bind HOST:PORT with at "
                          "least one --backend HOST:PORT")
    loaded = config_module.from_arguments(args.bind, args.backend,
                                          connect_timeout_ms=args.connect_timeout_ms,
                                          workers=args.workers, threads=args.threads,
                                          relay=args.relay)
    loaded = config_module.with_overrides(loaded, pidfile=args.pidfile, log_file=args.log_file)
    return config_module.with_admin(loaded, args.admin)


def pidfile_from_args(args: argparse.Namespace) -> str:
    if args.pidfile:
        return args.pidfile
    loaded = config_module.load_file(args.config)
    if not loaded.server.pidfile:
        raise ConfigError(f"{args.config}: [server] has no \"pidfile\"; give --pidfile")
    return loaded.server.pidfile


def control_command(args: argparse.Namespace) -> int:
    """``reload``, ``upgrade``, ``stop`` and ``status``: act on a running master through its
    pidfile."""
    try:
        pidfile = pidfile_from_args(args)
        if args.command == "reload":
            pid = control.signal_master(pidfile, signal.SIGHUP)
            print(f"sent SIGHUP to master {pid}: it reloads, or logs why it kept the old config")
        elif args.command == "backend":
            return backend_command(pidfile, args.words)
        elif args.command == "upgrade":
            outcome = control.upgrade_master(pidfile, args.timeout)
            print(outcome.message)
            return EXIT_OK if outcome.ok else EXIT_FAILURE
        elif args.command == "stop":
            pid = control.stop_master(pidfile, args.timeout, fast=args.fast)
            print(f"master {pid} stopped")
        else:
            status = control.read_status(pidfile)
            print(status_model.render_text(status))
            if status_model.problems(status):
                return EXIT_FAILURE  # health checks (Docker HEALTHCHECK, probes) rely on it
    except ConfigError as exc:
        print(f"prefork-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ProxyError as exc:
        print(f"prefork-proxy: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def backend_command(pidfile: str, words: List[str]) -> int:
    """``backend list`` / ``backend LISTENER BACKEND ACTION``: ask the master, print its answer."""
    if words == ["list"]:
        message = {"command": "list"}
    elif len(words) in (3, 4) and words[-1] in backend_control.ACTIONS:
        # LISTENER [ROUTE] BACKEND ACTION: ROUTE names an SNI route's pool.
        message = {"command": "set", "listener": words[0], "backend": words[-2],
                   "route": words[1] if len(words) == 4 else "", "action": words[-1]}
    else:
        raise ConfigError("backend: expected `list` or LISTENER [ROUTE] BACKEND "
                          f"{'|'.join(backend_control.ACTIONS)}, got {' '.join(words)!r}")
    reply = backend_control.request(pidfile, message)
    if not reply.get("ok"):
        print(f"prefork-proxy: {reply.get('error', 'the master refused the request')}",
              file=sys.stderr)
        return EXIT_CONFIG if reply.get("usage") else EXIT_FAILURE
    if message["command"] == "set":
        route = f" route {message['route']}" if message["route"] else ""
        print(f"backend {message['backend']} of listener {words[0]}{route}: {words[-1]}")
    print(backend_control.render(reply.get("backends", [])))
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("reload", "upgrade", "stop", "status", "backend"):
        return control_command(args)
    if args.command == "check":
        try:
            loaded = config_module.load_file(args.config)
        except ConfigError as exc:
            print(f"prefork-proxy: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{args.config}: OK: {loaded.summary()}")
        return EXIT_OK

    configure_logging(args.log_level)
    try:
        loaded = config_from_start_args(args)
        if loaded.server.log_file:
            configure_logging(args.log_level, loaded.server.log_file)
    except ConfigError as exc:
        logging.getLogger("prefork_proxy").error("%s", exc)
        return EXIT_CONFIG
    except OSError as exc:
        logging.getLogger("prefork_proxy").error("cannot open the log file: %s", exc)
        return EXIT_FAILURE
    from prefork_proxy.handover import restart_command
    from prefork_proxy.health import install_test_dns
    from prefork_proxy.master import serve  # imported late: `check` never needs it

    install_test_dns()  # only with PREFORK_PROXY_TEST_DNS set: the test suite's hook

    # SIGHUP re-reads the file with the same command-line overrides.
    loader = (lambda: config_from_start_args(args)) if args.config else None
    # SIGUSR2 starts this same command line again, from the program on disk then.
    command = restart_command(sys.argv[1:] if argv is None else argv)
    return serve(loaded, loader, command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
