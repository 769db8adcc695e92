"""deploy/kubernetes/: the manifests, validated offline and held to the proxy's own facts.

No cluster runs where these tests run.  Each manifest is validated against the
Kubernetes API schemas that ``kubernetes-validate`` ships (``--strict``: an
unknown or misspelt field fails too) for several minor versions, and linted by
``yamllint --strict``.  The rest reads the manifests next to what they must
agree with: the TOML in the ConfigMap passes ``prefork-proxy check``; the
probes and the Prometheus annotations name the admin port of that TOML; the
kubelet's grace period covers preStop + ``drain_timeout_s`` + the master's own
kill grace; the environment variables are ones the entrypoint maps to flags;
the user, pidfile and config paths are the Dockerfile's.
"""

from __future__ import annotations

import http.client
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from support import ProxyProcess, recv_exactly, transform, wait_for

import prefork_proxy
from prefork_proxy.config import DEFAULT_DRAIN_TIMEOUT_S
from prefork_proxy.master import KILL_GRACE_S

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the package depends on tomli there
    import tomli as tomllib

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the test extra (yamllint)")

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = MANIFESTS / "kustomization.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
YAMLLINT_CONFIG = ROOT / ".yamllint.yaml"
VENV_BIN = Path(sys.executable).parent

#: Validated against these Kubernetes minor versions, plus the newest schema set the
#: installed kubernetes-validate ships.  1.30 is the oldest still offered by the big
#: managed services (extended support); 1.33 is in between.
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")


def run(command: List[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kwargs)


def manifest_files() -> List[Path]:
    """Every Kubernetes resource file in deploy/kubernetes/ (the kustomization is not one)."""
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p != KUSTOMIZATION)


def documents(path: Path) -> List[Dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str) -> Dict[str, Any]:
    """The one resource of ``kind`` among the manifests."""
    found = [doc for path in manifest_files() for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes/, found {len(found)}"
    return found[0]


def pod_spec() -> Dict[str, Any]:
    return resource("Deployment")["spec"]["template"]["spec"]


def proxy_container() -> Dict[str, Any]:
    containers = pod_spec()["containers"]
    assert [c["name"] for c in containers] == ["prefork-proxy"]
    return containers[0]


def proxy_toml_text() -> str:
    return resource("ConfigMap")["data"]["proxy.toml"]


def proxy_toml() -> Dict[str, Any]:
    return tomllib.loads(proxy_toml_text())


def split_endpoint(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def admin_port() -> int:
    host, port = split_endpoint(proxy_toml()["admin"]["bind"])
    # The kubelet probes, and Prometheus scrapes, the pod's own IP, not loopback.
    assert host in ("0.0.0.0", "::"), f"[admin] bind must be reachable at the pod IP: {host}"
    return port


def listener_ports() -> List[int]:
    return [split_endpoint(listener["bind"])[1] for listener in proxy_toml()["tcp_proxy"]]


def container_port(port: Any) -> int:
    """A probe's or Service's port (a number or a port name) as a containerPort number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in proxy_container().get("ports", [])}
    assert port in named, f"no containerPort named {port!r} (named: {sorted(named)})"
    return named[port]


def pre_stop_sleep_s() -> float:
    """The preStop delay: ``exec: sleep N`` or the built-in ``sleep: {seconds: N}``."""
    pre_stop = proxy_container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def dockerfile_env(name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text())
    assert match, f"{name} is not set in deploy/Dockerfile"
    return match.group(1)


# ------------------------------------------------------------------------ validation, lint


def test_every_manifest_passes_kubernetes_validate_strict():
    """Each resource of each file passes ``kubernetes-validate --strict`` for every version.

    The tool only *warns* (exit 0) about a kind it has no schema for, so the test
    expects one INFO "passed" line per resource and version and nothing else.
    """
    utils = pytest.importorskip("kubernetes_validate.utils",
                                reason="kubernetes-validate comes with the test extra")
    versions = [*KUBERNETES_VERSIONS, utils.latest_version()]
    files = [str(path.relative_to(ROOT)) for path in manifest_files()]
    command = [sys.executable, "-m", "kubernetes_validate", "--strict"]
    for version in versions:
        command += ["-k", version]
    result = run(command + files)
    print(result.stdout)  # the validation output, for -s and for failures
    assert result.returncode == 0, result.stdout + result.stderr
    expected = [f"INFO {name} passed for resource {doc['kind'].lower()}/"
                f"{doc['metadata']['name']} against version {utils.major_minor(version)}"
                for name in files for doc in documents(ROOT / name) for version in versions]
    assert result.stdout.splitlines() == expected


def test_strict_validation_rejects_a_misspelt_field():
    """The check above has teeth: a field the API does not know fails in strict mode."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = resource("Deployment")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_manifests_pass_yamllint_strict():
    """yamllint with the repository's config, warnings counted as errors."""
    pytest.importorskip("yamllint", reason="yamllint comes with the test extra")
    result = run([sys.executable, "-m", "yamllint", "--strict", "--format", "parsable",
                  "--config-file", str(YAMLLINT_CONFIG),
                  str(MANIFESTS.relative_to(ROOT)), str(YAMLLINT_CONFIG.relative_to(ROOT))])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), f"listed twice: {listed}"
    assert set(listed) == {path.name for path in manifest_files()}


def test_kustomization_sets_the_image_to_this_version():
    """The example deploys the image of this checkout's version (bump it with the version)."""
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    image = proxy_container()["image"]
    assert [entry["name"] for entry in kustomization["images"]] == [image.split(":")[0]]
    assert kustomization["images"][0]["newTag"] == prefork_proxy.__version__


def test_kustomize_build_validates():
    """What ``kubectl apply -k`` would send, built by kustomize, validates as well."""
    utils = pytest.importorskip("kubernetes_validate.utils",
                                reason="kubernetes-validate comes with the test extra")
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(MANIFESTS)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(MANIFESTS)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    result = run(command, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in built) == sorted(
        doc["kind"] for path in manifest_files() for doc in documents(path))
    for doc in built:
        for version in (*KUBERNETES_VERSIONS, utils.latest_version()):
            utils.validate(doc, version, strict=True)
    deployment = next(doc for doc in built if doc["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{prefork_proxy.__version__}")


# ------------------------------------------------------------------- the ConfigMap's TOML


def test_configmap_toml_passes_prefork_proxy_check(tmp_path):
    """The config the pods will load is valid for this checkout's proxy ([admin] included)."""
    config = tmp_path / "proxy.toml"
    config.write_text(proxy_toml_text())
    result = run([str(VENV_BIN / "prefork-proxy"), "check", "--config", str(config)],
                 timeout=30)
    assert result.returncode == 0, result.stderr
    assert f"{config}: OK: " in result.stdout


def test_configmap_is_mounted_where_the_image_reads_its_config():
    """A directory mount (no subPath, which never sees updates) at PREFORK_PROXY_CONFIG."""
    config_path = Path(dockerfile_env("PREFORK_PROXY_CONFIG"))
    configmap = resource("ConfigMap")
    assert config_path.name in configmap["data"]
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = [m for m in proxy_container()["volumeMounts"]
              if volumes[m["name"]].get("configMap", {}).get("name")
              == configmap["metadata"]["name"]]
    assert len(mounts) == 1
    assert mounts[0]["mountPath"] == str(config_path.parent)
    assert "subPath" not in mounts[0] and mounts[0]["readOnly"] is True


def test_the_pod_serves_its_probe_and_scrape_paths(tmp_path, backend_factory):
    """The ConfigMap's TOML, started as the pod starts it, answers what the manifests ask.

    The entrypoint runs with the environment the Deployment gives it (the worker
    count the kubelet derives from the CPU limit), the config is the ConfigMap's
    with only its addresses moved to loopback (port 0) and its backends to a
    local one; the probe paths and the scrape path of the manifests answer 200,
    and bytes cross the listener.
    """
    backend = backend_factory("echo")
    text = proxy_toml_text()
    for listener in proxy_toml()["tcp_proxy"]:
        text = text.replace(f'bind = "{listener["bind"]}"', 'bind = "127.0.0.1:0"')
    text = text.replace(f'bind = "{proxy_toml()["admin"]["bind"]}"', 'bind = "127.0.0.1:0"')
    text = re.sub(r"(?m)^backends = \[.*\]$", f'backends = ["{backend.address}"]', text)
    assert text.count('"127.0.0.1:0"') == len(listener_ports()) + 1, text
    config = tmp_path / "proxy.toml"
    config.write_text(text)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PREFORK_PROXY_") and key != "NOTIFY_SOCKET"}
    env.update(PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "/usr/bin:/bin")]),
               PREFORK_PROXY_CONFIG=str(config),
               PREFORK_PROXY_PIDFILE=str(tmp_path / "prefork-proxy.pid"),
               PREFORK_PROXY_WORKERS=str(workers_for_cpu_limit(
                   proxy_container()["resources"]["limits"]["cpu"])))
    proxy = ProxyProcess((), tmp_path / "pod.log", env=env, command=["sh", str(ENTRYPOINT)])
    try:
        assert f"--workers {env['PREFORK_PROXY_WORKERS']} " in proxy.log
        port = int(wait_for(lambda: re.search(r"admin\b.*?127\.0\.0\.1:(\d+)", proxy.log),
                            message="the admin endpoint's log line").group(1))
        container = proxy_container()
        annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
        for path in (container["readinessProbe"]["httpGet"]["path"],
                     container["livenessProbe"]["httpGet"]["path"],
                     annotations["prometheus.io/path"]):
            # Retried as the kubelet retries: /ready says 503 until a worker accepts.
            status = wait_for(lambda path=path: http_status(port, path) not in (0, 503),
                              timeout=10, message=f"GET {path} answered")
            assert http_status(port, path) == 200, (path, status)
        with proxy.connect() as client:
            client.sendall(b"through the pod's listener")
            assert recv_exactly(client, 26) == transform(b"through the pod's listener")
    finally:
        assert proxy.stop() == 0, proxy.log


def workers_for_cpu_limit(limit: str) -> int:
    """What ``resourceFieldRef: limits.cpu`` with divisor 1 gives: whole CPUs, rounded up."""
    cpus = int(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    return max(1, math.ceil(cpus))


def http_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


# ------------------------------------------------------------------------- the Deployment


def test_termination_grace_covers_prestop_drain_and_kill_grace():
    """SIGKILL must not come before the master is done: the kubelet's clock starts at
    preStop, then SIGTERM drains for up to drain_timeout_s, then the master waits
    KILL_GRACE_S before it kills what is left and exits."""
    spec = pod_spec()
    drain = float(proxy_toml().get("server", {}).get("drain_timeout_s",
                                                     DEFAULT_DRAIN_TIMEOUT_S))
    pre_stop = pre_stop_sleep_s()
    assert pre_stop >= 1  # the window for endpoint removal to spread
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain + KILL_GRACE_S


def test_probes_and_scrape_annotations_point_at_the_admin_port():
    port = admin_port()
    container = proxy_container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/ready" and container_port(readiness["port"]) == port
    assert liveness["path"] == "/live" and container_port(liveness["port"]) == port
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The Service carries client traffic only; metrics are scraped per pod.
    service_ports = [container_port(p["targetPort"]) for p in resource("Service")["spec"]["ports"]]
    assert port not in service_ports


def test_worker_count_comes_from_the_cpu_limit_through_the_entrypoint():
    container = proxy_container()
    env = {item["name"]: item for item in container["env"]}
    source = env["PREFORK_PROXY_WORKERS"]["valueFrom"]["resourceFieldRef"]
    assert source["resource"] == "limits.cpu"
    assert str(source.get("divisor", "1")) == "1"  # whole CPUs, rounded up
    assert "cpu" in container["resources"]["limits"]
    # Every variable is one the entrypoint turns into a flag.
    entrypoint = ENTRYPOINT.read_text()
    for name in env:
        assert re.search(rf'if \[ -n "\${{{name}:-}}" \]; then set -- --', entrypoint), name
    assert "workers" not in proxy_toml().get("server", {})  # the limit decides alone


def test_pod_runs_non_root_read_only_without_capabilities():
    spec = pod_spec()
    container = proxy_container()
    pod_security = spec["securityContext"]
    security = container["securityContext"]
    uid, gid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M).groups()
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == int(uid) and pod_security["runAsGroup"] == int(gid)
    seccomp = security.get("seccompProfile") or pod_security.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    low_port = any(port < 1024 for port in [*listener_ports(), admin_port()])
    assert security["capabilities"].get("add", []) == (["NET_BIND_SERVICE"] if low_port else [])
    # The pidfile (and status file) directory is writable: an emptyDir.
    run_dir = str(Path(dockerfile_env("PREFORK_PROXY_PIDFILE")).parent)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[run_dir]["name"]]


def test_resources_ports_and_selectors_fit_together():
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = proxy_container()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        assert kind in resources["requests"] and kind in resources["limits"]
    # Every listener of the TOML is a containerPort, and the Service forwards to it.
    ports = {p["containerPort"] for p in container["ports"]}
    assert set(listener_ports()) <= ports
    service = resource("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {container_port(p["targetPort"]) for p in service["spec"]["ports"]} == set(
        listener_ports())
    pdb = resource("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2  # a PDB of maxUnavailable 1 then keeps one
    assert "cpu" in resources["requests"]  # utilization is a share of the request
