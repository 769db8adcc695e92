"""The ``prefork-proxy`` command: ``start`` and ``check``.

Runs in the process that becomes the master.  Owns argument parsing, logging
setup and exit codes (``errors.EXIT_*``): 0 served and stopped cleanly, 1 a
runtime failure such as a listener that cannot be bound, 2 an invalid
configuration or command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from prefork_proxy import config as config_module
from prefork_proxy.config import RELAY_MODES, Config
from prefork_proxy.errors import EXIT_CONFIG, EXIT_OK, ConfigError

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefork-proxy",
        description="A Layer-4 TCP reverse proxy: a master process and prefork workers "
                    "relaying raw bytes to a pool of backends.")
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
    start.add_argument("--threads", type=int, metavar="N", help="relay threads per worker")
    start.add_argument("--relay", choices=RELAY_MODES, help="how bytes move (default auto)")
    start.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check", help="validate a config file without binding anything",
                                description="Exit 0 with a summary, or 2 with the error.")
    check.add_argument("--config", "-c", metavar="FILE", required=True, help="TOML config file")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT,
                        stream=sys.stderr)


def config_from_start_args(args: argparse.Namespace) -> Config:
    """The config that ``start`` serves: a file plus overrides, or --bind/--backend."""
    if args.config:
        if args.bind or args.backend:
            raise ConfigError("command line: give either --config or --bind/--backend, not both")
        loaded = config_module.load_file(args.config)
        return config_module.with_overrides(loaded, workers=args.workers, threads=args.threads,
                                            relay=args.relay)
    if not args.bind or not args.backend:
        raise ConfigError("command line: expected --config FILE, or --bind HOST:PORT with at "
                          "least one --backend HOST:PORT")
    return config_module.from_arguments(args.bind, args.backend,
                                        connect_timeout_ms=args.connect_timeout_ms,
                                        workers=args.workers, threads=args.threads,
                                        relay=args.relay)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    except ConfigError as exc:
        logging.getLogger("prefork_proxy").error("%s", exc)
        return EXIT_CONFIG
    from prefork_proxy.master import serve  # imported late: `check` never needs it

    return serve(loaded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
