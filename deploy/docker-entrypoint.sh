#!/bin/sh
# The container entrypoint: environment variables -> command-line flags, then exec.
#
# Owned by the deploy files (deploy/); installed by deploy/Dockerfile as
# /usr/local/bin/prefork-proxy-entrypoint and run by Docker as PID 1.  It must
# end in `exec`, so that the master *replaces* this shell and is PID 1 itself:
# `docker stop` then signals the master (SIGTERM = graceful drain), and the
# master reaps every child, orphans re-parented to PID 1 included (master.py's
# reap() loops on waitpid(-1, WNOHANG)).  A shell left as PID 1 would neither
# pass SIGTERM on nor reap.
#
#   (no arguments)     prefork-proxy start --config "$PREFORK_PROXY_CONFIG" + flags from the environment
#   -f|--flag ...      the same, with these flags appended (they win over the environment)
#   start [FLAG...]    the same
#   check [FLAG...]    prefork-proxy check --config "$PREFORK_PROXY_CONFIG" [FLAG...]
#   anything else      run as is: `docker run --rm -it IMAGE sh`, `... IMAGE prefork-proxy --help`
#
# Environment -> flag of `prefork-proxy start` (unset or empty: the flag is left out):
#   PREFORK_PROXY_CONFIG     --config     default /etc/prefork-proxy/proxy.toml; left out
#                                         when the arguments give --bind
#   PREFORK_PROXY_WORKERS    --workers
#   PREFORK_PROXY_THREADS    --threads
#   PREFORK_PROXY_RELAY      --relay      auto | splice | copy
#   PREFORK_PROXY_LOG_LEVEL  --log-level  debug | info | warning | error
#   PREFORK_PROXY_PIDFILE    --pidfile    the image sets it, for `prefork-proxy status`
set -eu

config="${PREFORK_PROXY_CONFIG:-/etc/prefork-proxy/proxy.toml}"

case "${1:-}" in
  check)
    shift
    exec prefork-proxy check --config "$config" "$@"
    ;;
  start)
    shift
    ;;
  -*|"")
    ;;
  *)
    exec "$@"
    ;;
esac

# --bind/--backend serve without a file; the CLI refuses --config together with them.
uses_bind=no
for arg in "$@"; do
  case "$arg" in
    --bind|--bind=*|-b|-b?*) uses_bind=yes ;;
  esac
done

# Prepended one by one, so the operator's own flags stay last and win (argparse keeps
# the last value of a repeated option).
if [ -n "${PREFORK_PROXY_PIDFILE:-}" ]; then set -- --pidfile "$PREFORK_PROXY_PIDFILE" "$@"; fi
if [ -n "${PREFORK_PROXY_LOG_LEVEL:-}" ]; then set -- --log-level "$PREFORK_PROXY_LOG_LEVEL" "$@"; fi
if [ -n "${PREFORK_PROXY_RELAY:-}" ]; then set -- --relay "$PREFORK_PROXY_RELAY" "$@"; fi
if [ -n "${PREFORK_PROXY_THREADS:-}" ]; then set -- --threads "$PREFORK_PROXY_THREADS" "$@"; fi
if [ -n "${PREFORK_PROXY_WORKERS:-}" ]; then set -- --workers "$PREFORK_PROXY_WORKERS" "$@"; fi
if [ "$uses_bind" = no ]; then set -- --config "$config" "$@"; fi

echo "prefork-proxy-entrypoint: exec prefork-proxy start $*" >&2
exec prefork-proxy start "$@"
