"""deploy/: the container entrypoint run as a plain process, and what the image runs.

No Docker engine runs where these tests run, so ``deploy/docker-entrypoint.sh``
is started directly, with the environment Docker would give it and ``PATH``
leading to this venv's ``prefork-proxy``.  What the image adds around it (user,
paths, HEALTHCHECK) is checked by reading ``deploy/Dockerfile``, and the
HEALTHCHECK's own command is run against a live proxy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from support import (
    ProxyProcess,
    children_of,
    process_state,
    recv_exactly,
    status_field,
    transform,
    wait_for,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def entrypoint_env(**variables: str) -> Dict[str, str]:
    """This environment without PREFORK_PROXY_*/NOTIFY_SOCKET, plus ``variables``.

    ``PATH`` starts with the directory of this Python (the venv's bin, where
    ``prefork-proxy`` is installed), as /usr/local/bin is in the image.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFORK_PROXY_") and key != "NOTIFY_SOCKET"}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable),
                                   env.get("PATH", "/usr/bin:/bin")])
    env.update(variables)
    return env


def echo_config(tmp_path: Path, backend_address: str, name: str = "proxy.toml") -> Path:
    return write_config(tmp_path / name, textwrap.dedent(f"""
        [server]
        workers = 1
        # Bounded even if a stray client (another test run, a benchmark) holds a connection.
        drain_timeout_s = 3
        [[tcp_proxy]]
        bind = "127.0.0.1:0"
        backends = ["{backend_address}"]
    """))


def ready_line(proxy: ProxyProcess) -> str:
    match = re.search(r"ready pid=\d+ .*", proxy.log)
    assert match, proxy.log
    return match.group(0)


def parent_pid(pid: int) -> int:
    return status_field(pid, "PPid")


def round_trip(proxy: ProxyProcess, size: int = 256 * 1024) -> None:
    payload = os.urandom(size)
    with proxy.connect() as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, size) == transform(payload)


@pytest.fixture
def started(tmp_path):
    """Start the entrypoint like ``ProxyProcess``; every instance is stopped after the test."""
    proxies: List[ProxyProcess] = []

    def start(env: Dict[str, str], *args: str, command: Optional[List[str]] = None,
              wait_ready: bool = True) -> ProxyProcess:
        proxy = ProxyProcess((), tmp_path / f"entrypoint-{len(proxies)}.log",
                             command=command or [str(ENTRYPOINT), *args], env=env,
                             wait_ready=wait_ready)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        # Should the entrypoint ever fail to exec, stopping the shell would orphan the master.
        match = re.search(r"ready pid=(\d+) ", proxy.log)
        if match and int(match.group(1)) != proxy.pid and process_state(int(match.group(1))):
            os.kill(int(match.group(1)), signal.SIGTERM)
        proxy.stop()


def test_entrypoint_execs_the_master_with_flags_from_the_environment(
        backend_factory, started, tmp_path):
    backend = backend_factory("echo")
    config = echo_config(tmp_path, backend.address)
    proxy = started(entrypoint_env(PREFORK_PROXY_CONFIG=str(config), PREFORK_PROXY_WORKERS="2",
                                   PREFORK_PROXY_THREADS="3", PREFORK_PROXY_RELAY="copy",
                                   PREFORK_PROXY_LOG_LEVEL="debug"))
    line = ready_line(proxy)
    # The pid that logs "ready" is the pid Docker started: the shell exec'd the master,
    # so `docker stop` signals the master itself.
    assert f"ready pid={proxy.pid} " in line
    assert "workers=2 threads=3 relay=copy" in line  # the config file says workers = 1
    workers = proxy.wait_workers(2)

    round_trip(proxy)
    wait_for(lambda: " DEBUG " in proxy.log, message="a debug line (PREFORK_PROXY_LOG_LEVEL)")

    assert proxy.stop() == 0
    # The master exits only once it has reaped its workers: none is left, not even a zombie.
    assert [pid for pid in workers if process_state(pid) is not None] == []


def test_master_as_pid_1_reaps_children_it_did_not_fork(backend_factory, started, tmp_path):
    """An orphan re-parented to PID 1 is a child the master never forked; it must reap it.

    Stand-in: the shell starts ``sleep`` in the background and then execs the
    entrypoint, so the master inherits a child it does not know.
    """
    backend = backend_factory("echo")
    config = echo_config(tmp_path, backend.address)
    sleeper_file = tmp_path / "sleeper.pid"
    command = ["sh", "-c", 'sleep 600 & echo "$!" > "$1"; exec "$2"', "sh",
               str(sleeper_file), str(ENTRYPOINT)]
    proxy = started(entrypoint_env(PREFORK_PROXY_CONFIG=str(config), PREFORK_PROXY_WORKERS="2"),
                    command=command)
    sleeper = int(sleeper_file.read_text())
    try:
        assert f"ready pid={proxy.pid} " in ready_line(proxy)
        assert parent_pid(sleeper) == proxy.pid
        os.kill(sleeper, signal.SIGKILL)
        # A zombie stays in /proc until its parent waits for it: gone means reaped.
        wait_for(lambda: process_state(sleeper) is None, message="the master to reap the orphan")
    finally:
        if process_state(sleeper) not in (None, "Z"):
            os.kill(sleeper, signal.SIGKILL)
    round_trip(proxy)  # reaping a stranger did not disturb the workers
    workers = children_of(proxy.pid)
    assert len(workers) == 2
    assert proxy.stop() == 0
    assert [pid for pid in workers if process_state(pid) is not None] == []


def test_arguments_are_appended_and_win_over_the_environment(backend_factory, started):
    """Flags after the image name go to `start`; --bind serves without the config file."""
    backend = backend_factory("echo")
    env = entrypoint_env(PREFORK_PROXY_CONFIG="/nonexistent/proxy.toml",
                         PREFORK_PROXY_WORKERS="3")
    proxy = started(env, "--bind", "127.0.0.1:0", "--backend", backend.address,
                    "--workers", "1")
    assert f"ready pid={proxy.pid} " in ready_line(proxy)
    assert " workers=1 " in ready_line(proxy)
    round_trip(proxy)
    assert proxy.stop() == 0


def run_entrypoint(*args: str, env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=30)


def test_check_command_validates_the_configured_file(tmp_path):
    good = echo_config(tmp_path, "127.0.0.1:9", "good.toml")
    result = run_entrypoint("check", env=entrypoint_env(PREFORK_PROXY_CONFIG=str(good)))
    assert result.returncode == 0, result.stderr
    assert f"{good}: OK: 1 listener(s)" in result.stdout

    bad = write_config(tmp_path / "bad.toml",
                       '[[tcp_proxy]]\nbind = "127.0.0.1:0"\nbackends = []\n')
    result = run_entrypoint("check", env=entrypoint_env(PREFORK_PROXY_CONFIG=str(bad)))
    assert result.returncode == 2
    assert f'{bad}:3: tcp_proxy[1] (bind "127.0.0.1:0"): key "backends"' in result.stderr


def test_other_commands_run_as_given():
    result = run_entrypoint("sh", "-c", 'echo "as is: $1"', "sh", "two words",
                            env=entrypoint_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "as is: two words\n"


# -------------------------------------------------------------------- the image's Dockerfile


def dockerfile_instructions() -> List[List[str]]:
    """``[INSTRUCTION, rest]`` per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_what_the_repository_ships():
    """No Docker engine here: at least the image's paths must agree with the repository."""
    instructions = dockerfile_instructions()
    copies = {}
    for name, rest in instructions:
        if name == "COPY" and "--from=" not in rest:  # --from copies from a build stage
            *sources, destination = [w for w in rest.split() if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the repo"
                copies[source] = destination
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(r for n, r in instructions if n == "ENV")))
    entrypoint = json.loads(next(r for n, r in instructions if n == "ENTRYPOINT"))
    assert entrypoint == [copies["deploy/docker-entrypoint.sh"]]
    assert copies["deploy/proxy.toml"] == env["PREFORK_PROXY_CONFIG"] \
        == "/etc/prefork-proxy/proxy.toml"
    user = [r for n, r in instructions if n == "USER"][-1].split(":")[0]  # the final one
    assert user not in ("0", "root")
    assert next(r for n, r in instructions if n == "STOPSIGNAL") == "SIGTERM"


def test_dockerfile_healthcheck_passes_while_serving_and_fails_after(
        backend_factory, started, tmp_path):
    """Run the HEALTHCHECK's exact command with the image's environment variables."""
    healthcheck = next(r for n, r in dockerfile_instructions() if n == "HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    backend = backend_factory("echo")
    config = echo_config(tmp_path, backend.address)
    env = entrypoint_env(PREFORK_PROXY_CONFIG=str(config),
                         PREFORK_PROXY_PIDFILE=str(tmp_path / "prefork-proxy.pid"))

    def healthy() -> bool:
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0

    proxy = started(env)
    # The status file appears with the master's first loop turn: Docker's start period.
    wait_for(healthy, message="the HEALTHCHECK command to pass")
    assert proxy.stop() == 0
    assert not healthy()
