"""Installing what the benchmark needs: the peers (Debian packages), its Python, matplotlib.

The Python side is the repo's own ``.venv``, made by ``scripts/bootstrap bench``
(prefork-proxy in editable mode plus the ``bench`` extra, i.e. matplotlib for
the PNG chart): ``scripts/bench`` runs that first and re-executes itself under
the venv's Python, as a new user's ``./scripts/bench`` on a fresh clone must
produce the chart too. The system Python is never pip-installed into.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

APT_PACKAGES = ["haproxy", "nginx", "libnginx-mod-stream", "socat", "iperf3",
                "redis-server", "redis-tools"]
REQUIRED_BINARIES = ["haproxy", "nginx", "socat", "iperf3", "redis-server", "redis-benchmark"]
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

APT_UPDATE_TIMEOUT = 300
APT_INSTALL_TIMEOUT = 600
PIP_TIMEOUT = 300
BOOTSTRAP_TIMEOUT = 900  # a fresh venv: pip, setuptools, prefork-proxy's deps, matplotlib

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV = REPO_ROOT / ".venv"
#: Set in the environment of the re-executed benchmark, so it never loops.
REEXEC_ENV = "PREFORK_BENCH_IN_VENV"


def in_repo_venv() -> bool:
    """True when this Python is the repo's ``.venv``."""
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


def ensure_bench_venv(log, allow_install: bool) -> Path | None:
    """The Python of the repo's ``.venv`` with the ``bench`` extra; None if there is none.

    With ``allow_install``: ``scripts/bootstrap bench`` (creates the venv if
    missing; a no-op pip run when everything is installed). Without it, an
    existing venv is used as it is.
    """
    python = VENV / "bin" / "python"
    if allow_install:
        log("python: scripts/bootstrap bench (the repo's .venv with prefork-proxy and matplotlib)")
        try:
            _run([str(REPO_ROOT / "scripts" / "bootstrap"), "bench"], BOOTSTRAP_TIMEOUT, None)
        except RuntimeError as exc:
            log(f"python: bootstrap failed ({exc}); staying on {sys.executable}")
            return None
    return python if python.exists() else None


def missing_binaries() -> list[str]:
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    # nginx on Debian ships `stream` as a separate dynamic-module package.
    if shutil.which("nginx") and not NGINX_STREAM_MODULE.exists() and not nginx_has_static_stream():
        missing.append("ngx_stream_module")
    return missing


def nginx_has_static_stream() -> bool:
    """True if this nginx was built with `stream` compiled in (no .so to load)."""
    try:
        out = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # `--with-stream` alone means static; `--with-stream=dynamic` means a module.
    return "--with-stream" in (out.stderr + out.stdout).split()


def ensure_peers(log) -> None:
    """apt-get install the peers unless every binary is already there."""
    missing = missing_binaries()
    if not missing:
        log("peers: all binaries present, skipping install")
        return
    log(f"peers: missing {', '.join(missing)}; installing with apt-get")
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get not found: install " + " ".join(APT_PACKAGES) + " by hand")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(sudo + ["apt-get", "update", "-q"], APT_UPDATE_TIMEOUT, env)
    _run(sudo + ["apt-get", "install", "-y", "-q", *APT_PACKAGES], APT_INSTALL_TIMEOUT, env)
    still = missing_binaries()
    if still:
        raise RuntimeError(f"still missing after apt-get install: {', '.join(still)}")


def ensure_matplotlib(log, allow_install: bool) -> bool:
    """True if matplotlib imports (after a best-effort pip install)."""
    if _matplotlib_imports():
        return True
    if not allow_install:
        return False
    log("chart: matplotlib missing; trying `pip install matplotlib` (optional)")
    try:
        _run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], PIP_TIMEOUT, None)
    except RuntimeError as exc:
        log(f"chart: pip install failed ({exc}); no PNG chart")
        return False
    return _matplotlib_imports()


def _matplotlib_imports() -> bool:
    try:
        import importlib
        importlib.invalidate_caches()
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        return False


def _run(argv: list[str], timeout: int, env: dict[str, str] | None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"`{' '.join(argv)}` timed out after {timeout} s") from exc
    except OSError as exc:
        raise RuntimeError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-10:])
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{tail}")
