"""Offline checks of deploy/: the Kubernetes manifests, the container build and the systemd units.

Every manifest in deploy/k8s is validated with `kubernetes-validate --strict` (its schemas are
bundled, no network), and the properties a careful platform team asks for are checked one by one.
The settings gunicorn will actually run with are computed from the Deployment's own command and
environment, the way gunicorn loads them: vrypt_worker/conf.py, then the command-line flags.
The Docker engine is not needed: deploy/Dockerfile is checked statically.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from gunicorn.config import Config

from tests.statsd_mapping import Mapper, scraped_labels
from vrypt_worker import families, metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
SYSTEMD = DEPLOY / "systemd"

# The oldest Kubernetes the manifests target (native sidecars and the preStop sleep action are on
# by default from 1.30) and the newest that kubernetes-validate bundles schemas for.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
SUBPROCESS_TIMEOUT = 60  # seconds, for every command a test runs

# Metrics the server sends (its pusher and gunicorn's statsd logger), as (StatsD name, StatsD
# type), and the Prometheus series the mapping must turn each into, with any statsd_prefix.
STATSD_TO_PROMETHEUS = {
    ("vrypt.rps", "gauge"): ("vrypt_requests_per_second", {}),
    ("vrypt.connections", "gauge"): ("vrypt_open_connections", {}),
    ("vrypt.bad_requests", "counter"): ("vrypt_bad_requests_total", {}),
    ("gunicorn.requests", "counter"): ("gunicorn_requests_total", {}),
    ("gunicorn.workers", "gauge"): ("gunicorn_workers", {}),
    ("gunicorn.log.critical", "counter"): ("gunicorn_log_messages_total", {"level": "critical"}),
    ("gunicorn.log.error", "counter"): ("gunicorn_log_messages_total", {"level": "error"}),
    ("gunicorn.log.warning", "counter"): ("gunicorn_log_messages_total", {"level": "warning"}),
    ("gunicorn.log.exception", "counter"): ("gunicorn_log_messages_total", {"level": "exception"}),
}
# The gauges: sent every interval, so the exporter may forget them when a pod stops sending.
GAUGES = {name for (_, kind), (name, _) in STATSD_TO_PROMETHEUS.items() if kind == "gauge"}
STATSD_LINE_TYPES = {"gauge": "g", "counter": "c"}


# --- loading ------------------------------------------------------------------------------------


def load_yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def manifest_files() -> list[Path]:
    """The Kubernetes resources of deploy/k8s: every YAML file there but kustomization.yaml."""
    files = sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))
    return [p for p in files if p.name not in ("kustomization.yaml", "kustomization.yml")]


def load_resources() -> dict[tuple[str, str], dict]:
    resources = {}
    for path in manifest_files():
        for doc in load_yaml_documents(path.read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in resources, f"{key} defined twice"
            resources[key] = doc
    return resources


RESOURCES = load_resources()


def only(kind: str) -> dict:
    found = [r for (k, _), r in RESOURCES.items() if k == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


DEPLOYMENT = only("Deployment")
POD = DEPLOYMENT["spec"]["template"]
POD_SPEC = POD["spec"]
MAIN = next(c for c in POD_SPEC["containers"] if c["name"] == "vrypt")
SIDECARS = [c for c in POD_SPEC.get("initContainers", []) if c.get("restartPolicy") == "Always"]
ALL_CONTAINERS = POD_SPEC["containers"] + POD_SPEC.get("initContainers", [])


def exporter() -> dict:
    found = [c for c in SIDECARS if c["image"].split(":")[0] == "prom/statsd-exporter"]
    assert len(found) == 1, "expected one prom/statsd-exporter native sidecar"
    return found[0]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of a `--flag=value` or `--flag value` argument, None when absent."""
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def parse_quantity(value: str | int) -> float:
    """A Kubernetes resource quantity (the forms used here) as a number of units or bytes."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def container_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (literal values and CPU limits)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["resourceFieldRef"]
        target = next(c for c in ALL_CONTAINERS if c["name"] == ref.get("containerName"))
        resource_type, resource = ref["resource"].split(".")
        amount = parse_quantity(target["resources"][resource_type][resource])
        # The kubelet rounds up to a whole multiple of the divisor.
        env[var["name"]] = str(math.ceil(amount / parse_quantity(ref.get("divisor", "1"))))
    return env


def gunicorn_settings(monkeypatch: pytest.MonkeyPatch) -> Config:
    """Gunicorn's settings for the Deployment's container, loaded as gunicorn loads them.

    conf/gunicorn.conf.py only re-exports vrypt_worker/conf.py, which is run here on its own (it
    needs nothing but the environment), under the container's environment; then the flags of the
    container's command are applied on top, as on gunicorn's command line.
    """
    command = MAIN["command"]
    assert command[:3] == ["gunicorn", "-c", "conf/gunicorn.conf.py"]
    assert "from vrypt_worker.conf import *" in (ROOT / "conf" / "gunicorn.conf.py").read_text()
    for name in ("PORT", "WEB_CONCURRENCY", "VRYPT_REUSE_PORT", "VRYPT_STATSD_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(MAIN).items():
        monkeypatch.setenv(name, value)
    cfg = Config()
    namespace = runpy.run_path(str(ROOT / "vrypt_worker" / "conf.py"))
    for name, value in namespace.items():
        if name in cfg.settings:
            cfg.set(name, value)
    args = cfg.parser().parse_args(command[1:])
    for name, value in vars(args).items():
        if value is not None and name in cfg.settings and name != "config":
            cfg.set(name, value)
    return cfg


def volume_for_path(container: dict, path: str, writable: bool = True) -> dict:
    """The pod volume mounted at `path` (or at a parent of it) in `container`."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"{path} is on no volume of container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    if writable:
        assert not mount.get("readOnly"), f"{mount['mountPath']} is mounted read-only"
    return next(v for v in POD_SPEC["volumes"] if v["name"] == mount["name"])


def matches_selector(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, **kwargs
    )


def kubernetes_validate_strict(files: list[Path], version: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version]
    return run([*command, *map(str, files)])


def assert_every_resource_passed(result: subprocess.CompletedProcess, count: int) -> None:
    """kubernetes-validate exits 0 on a kind it has no schema for (it only warns): insist on
    one "passed" line per resource and on no warning or error."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"^(WARN|ERROR|FATAL)", output, re.MULTILINE), output
    assert len(re.findall(r"^INFO .* passed for resource ", output, re.MULTILINE)) == count, output


# --- schema validation --------------------------------------------------------------------------


def test_kustomization_lists_exactly_the_manifests():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    assert {kind for kind, _ in RESOURCES} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    }


def test_kustomization_image_is_the_project_version():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    image = MAIN["image"].split(":")[0]
    assert [i["name"] for i in kustomization["images"]] == [image]
    assert kustomization["images"][0]["newTag"] == version.group(1)
    assert MAIN["image"] == f"{image}:{version.group(1)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(version):
    files = manifest_files()
    assert_every_resource_passed(kubernetes_validate_strict(files, version), len(RESOURCES))


def test_kubernetes_validate_strict_catches_an_unknown_field(tmp_path):
    """The strict mode really is in force: a misspelt field fails."""
    broken = json.loads(json.dumps(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = kubernetes_validate_strict([path], K8S_VERSIONS[0])
    assert result.returncode != 0
    assert "securityContex" in result.stdout


def apply_json_patch(document: dict, operations: list[dict]) -> dict:
    """The JSON-patch `add` operations the component uses (enough for its patches)."""
    document = json.loads(json.dumps(document))
    for op in operations:
        assert op["op"] == "add", op
        *parents, leaf = op["path"].lstrip("/").split("/")
        node = document
        for key in parents:
            node = node[key]
        node[leaf] = op["value"]
    return document


def test_the_base_needs_no_unsafe_sysctl():
    """The listener slots keep every queued connection across worker exits, so the pods need no
    net.ipv4.tcp_migrate_req (docs/deploy.md, docs/reliability.md)."""
    assert "sysctls" not in POD_SPEC["securityContext"]


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_kustomize_build_passes_kubernetes_validate_strict(tmp_path):
    directory = K8S
    built = run([KUBECTL, "kustomize", str(directory)])
    assert built.returncode == 0, built.stderr
    documents = load_yaml_documents(built.stdout)
    assert len(documents) == len(RESOURCES)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(built.stdout)
    for version in K8S_VERSIONS:
        result = kubernetes_validate_strict([rendered], version)
        assert_every_resource_passed(result, len(RESOURCES))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    assert deployment == DEPLOYMENT, "kustomize changed the Deployment"


# --- the Deployment -----------------------------------------------------------------------------


@pytest.mark.parametrize("container", ALL_CONTAINERS, ids=lambda c: c["name"])
def test_container_security_context(container):
    pod = POD_SPEC["securityContext"]
    own = container.get("securityContext", {})
    assert own.get("runAsNonRoot", pod.get("runAsNonRoot")) is True
    assert own.get("runAsUser", pod.get("runAsUser")) not in (None, 0)
    assert own.get("allowPrivilegeEscalation") is False
    assert own.get("readOnlyRootFilesystem") is True
    assert own.get("privileged") in (None, False)
    assert own["capabilities"]["drop"] == ["ALL"]
    assert not own["capabilities"].get("add")
    seccomp = own.get("seccompProfile", pod.get("seccompProfile"))
    assert seccomp == {"type": "RuntimeDefault"}


def test_pod_is_isolated_from_the_node_and_the_api():
    assert POD_SPEC["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        assert not POD_SPEC.get(field)
    assert POD_SPEC["automountServiceAccountToken"] is False
    assert POD_SPEC["enableServiceLinks"] is False
    assert all(not v.get("hostPath") for v in POD_SPEC["volumes"])


@pytest.mark.parametrize("container", ALL_CONTAINERS, ids=lambda c: c["name"])
def test_container_resources(container):
    resources = container["resources"]
    for resource in ("cpu", "memory"):
        request = parse_quantity(resources["requests"][resource])
        limit = parse_quantity(resources["limits"][resource])
        assert 0 < request <= limit, (container["name"], resource)


def resolve_port(container: dict, port: str | int) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_main_container_probes_are_http_gets_on_the_served_port():
    http = resolve_port(MAIN, "http")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = MAIN[probe]["httpGet"]
        assert resolve_port(MAIN, get["port"]) == http, probe
        assert get["path"].startswith("/")
        assert get.get("scheme", "HTTP") == "HTTP"
    # A liveness probe that fails faster than readiness would restart pods under load.
    live, ready = MAIN["livenessProbe"], MAIN["readinessProbe"]
    live_after = live["periodSeconds"] * live["failureThreshold"]
    assert live_after > ready["periodSeconds"] * ready["failureThreshold"]


def prestop_seconds(container: dict) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep", "/usr/bin/sleep"), command
    return int(command[1])


def test_prestop_pause_then_graceful_stop_fit_in_the_grace_period(monkeypatch):
    pause = prestop_seconds(MAIN)
    assert pause >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    graceful_timeout = gunicorn_settings(monkeypatch).graceful_timeout
    assert graceful_timeout == 30
    assert POD_SPEC["terminationGracePeriodSeconds"] > pause + graceful_timeout


def test_gunicorn_settings_in_the_container(monkeypatch):
    cfg = gunicorn_settings(monkeypatch)
    assert cfg.worker_class_str == "vrypt_worker.VryptWorker"
    # Bound where the Service and the probes send traffic.
    # Both families (issue 22): `[::]` with IPV6_V6ONLY off, or 0.0.0.0 without IPv6 sockets.
    assert cfg.bind == [families.default_bind(resolve_port(MAIN, "http"))]
    # One worker per CPU of the limit, not per CPU of the node.
    assert cfg.workers == math.ceil(parse_quantity(MAIN["resources"]["limits"]["cpu"]))
    assert cfg.reuse_port is True
    assert cfg.graceful_timeout == 30


def test_worker_tmp_dir_is_a_memory_backed_emptydir(monkeypatch):
    worker_tmp_dir = gunicorn_settings(monkeypatch).worker_tmp_dir
    assert worker_tmp_dir, "gunicorn's default tmp dir is on the read-only root filesystem"
    volume = volume_for_path(MAIN, worker_tmp_dir)
    assert volume["emptyDir"]["medium"] == "Memory"
    assert parse_quantity(volume["emptyDir"]["sizeLimit"]) <= parse_quantity(
        MAIN["resources"]["limits"]["memory"]
    )
    # Python's tempfile too, as nothing else is writable.
    assert container_env(MAIN)["TMPDIR"] == worker_tmp_dir


def test_control_socket_is_disabled_or_writable(monkeypatch):
    cfg = gunicorn_settings(monkeypatch)
    if not cfg.control_socket_disable:
        volume_for_path(MAIN, os.path.dirname(cfg.control_socket))


def test_flags_of_the_deployment_command_are_gunicorn_flags():
    """Each flag the Deployment adds is one this gunicorn knows, with a valid value."""
    parser = Config().parser()
    args = parser.parse_args(MAIN["command"][1:])
    assert args.config == "conf/gunicorn.conf.py"
    assert args.control_socket_disable is True


def test_gunicorn_check_config_accepts_the_deployment_command():
    """`gunicorn --check-config` with the container's exact arguments and environment, run from
    the project root (the container's working directory holds the same conf/)."""
    command = MAIN["command"]
    assert command[0] == "gunicorn"
    env = {**os.environ, **container_env(MAIN)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    gunicorn = [sys.executable, "-m", "gunicorn"]
    result = run([*gunicorn, "--check-config", *command[1:]], cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_container_command_serves_the_probes_and_mapped_metrics(tmp_path):
    """Run the container's command and environment for real (gunicorn, the worker, gevent) with
    a StatsD listener standing in for the exporter: every probe path answers 200 `Vrypt`, every
    metric that arrives has a name in the mapping, gunicorn writes nothing to $HOME (no control
    socket) and stops cleanly on SIGTERM."""
    command = MAIN["command"]
    run_dir, home = tmp_path / "run", tmp_path / "home"
    run_dir.mkdir()
    home.mkdir()
    worker_tmp_dir = flag_value(command, "--worker-tmp-dir")
    args = [str(run_dir) if a == worker_tmp_dir else a for a in command[1:]]
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    statsd.bind(("127.0.0.1", 0))
    statsd.settimeout(0.2)
    port = free_port(socket.SOCK_STREAM)
    env = {
        **os.environ,
        **container_env(MAIN),
        "PORT": str(port),
        "TMPDIR": str(run_dir),
        "HOME": str(home),
        "VRYPT_STATSD_HOST": f"127.0.0.1:{statsd.getsockname()[1]}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("XDG_RUNTIME_DIR", None)
    log = tmp_path / "gunicorn.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *args],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        paths = [
            MAIN[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        ]
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{paths[0]}", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, f"gunicorn exited early: {log.read_text()}"
                assert time.monotonic() < deadline, f"no answer within 20 s: {log.read_text()}"
                time.sleep(0.2)
        for path in paths:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                assert (r.status, r.read()) == (200, b"Vrypt"), path
        received: list[str] = []
        deadline = time.monotonic() + 10
        while not any("vrypt.rps" in line for line in received) and time.monotonic() < deadline:
            try:
                packet = statsd.recv(65535).decode()
            except TimeoutError:
                continue
            received += filter(None, packet.splitlines())
        assert any(line.startswith("gunicorn.workers:") for line in received), received
        unmapped = [s for line in received for s in mapper().series(line) if not s.mapped]
        assert not unmapped, f"StatsD metrics with no name in the mapping: {unmapped}"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=POD_SPEC["terminationGracePeriodSeconds"]) == 0
        assert list(home.iterdir()) == [], "gunicorn wrote to $HOME (the control socket?)"
    finally:
        statsd.close()
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
    output = log.read_text()
    assert "Traceback" not in output, output


def test_pods_spread_across_nodes_and_zones():
    labels = POD["metadata"]["labels"]
    constraints = {c["topologyKey"]: c for c in POD_SPEC["topologySpreadConstraints"]}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(constraints)
    for constraint in constraints.values():
        assert constraint["maxSkew"] == 1
        assert matches_selector(constraint["labelSelector"], labels)
        # Spread each ReplicaSet on its own, so a rollout does not pile onto a few nodes.
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    anti = POD_SPEC["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert any(
        t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and matches_selector(t["podAffinityTerm"]["labelSelector"], labels)
        for t in anti
    )


def test_rollout_never_drops_below_the_current_count():
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert matches_selector(DEPLOYMENT["spec"]["selector"], POD["metadata"]["labels"])


def test_image_runs_gunicorn_in_exec_form_from_the_working_directory():
    assert MAIN["workingDir"] == dockerfile_stages()[-1].workdir
    assert MAIN["command"][:3] == dockerfile_cmd()


# --- Service, PodDisruptionBudget, HorizontalPodAutoscaler --------------------------------------


def test_service_targets_the_pods_http_port():
    service = only("Service")
    assert service["spec"]["selector"] == DEPLOYMENT["spec"]["selector"]["matchLabels"]
    [port] = service["spec"]["ports"]
    assert resolve_port(MAIN, port["targetPort"]) == resolve_port(MAIN, "http")


def test_pod_disruption_budget():
    pdb = only("PodDisruptionBudget")["spec"]
    assert matches_selector(pdb["selector"], POD["metadata"]["labels"])
    assert pdb["maxUnavailable"] == 1
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert only("HorizontalPodAutoscaler")["spec"]["minReplicas"] > pdb["maxUnavailable"]


def test_hpa_scales_the_deployment_on_cpu():
    hpa = only("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [cpu] = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    # The HPA owns the replica count: a `replicas` in the Deployment would reset it on apply.
    assert "replicas" not in DEPLOYMENT["spec"]
    # How to scale on the RPS gauge is written down next to it.
    assert "vrypt_requests_per_second" in (K8S / "hpa.yaml").read_text()


# --- metrics: statsd-exporter sidecar and its mapping -------------------------------------------


def mapping_config() -> dict:
    args = exporter()["args"]
    path = flag_value(args, "--statsd.mapping-config")
    volume = volume_for_path(exporter(), path, writable=False)
    configmap = RESOURCES[("ConfigMap", volume["configMap"]["name"])]
    return yaml.safe_load(configmap["data"][os.path.basename(path)])


def test_statsd_exporter_is_a_native_sidecar_on_the_loopback(monkeypatch):
    sidecar = exporter()
    assert sidecar["restartPolicy"] == "Always"
    assert re.fullmatch(r"prom/statsd-exporter:v\d+\.\d+\.\d+", sidecar["image"])
    listen = flag_value(sidecar["args"], "--statsd.listen-udp")
    assert listen.startswith("127.0.0.1:")
    assert flag_value(sidecar["args"], "--statsd.listen-tcp") == ""
    # The worker sends where the exporter listens.
    host, _, port = listen.rpartition(":")
    assert gunicorn_settings(monkeypatch).statsd_host == (host, int(port))
    # gunicorn starts only once the exporter is up.
    assert sidecar["startupProbe"]["httpGet"]["port"] == "metrics"


def test_prometheus_scrapes_the_exporter_port():
    sidecar = exporter()
    web = flag_value(sidecar["args"], "--web.listen-address")
    port = resolve_port(sidecar, "metrics")
    assert web == f":{port}"
    annotations = POD["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert port not in [p["containerPort"] for p in MAIN["ports"]]


def mapper() -> Mapper:
    return Mapper(mapping_config())


@pytest.mark.parametrize("prefix", ["", "edge", "canary.eu-west-1", "vrypt"])
@pytest.mark.parametrize("statsd", STATSD_TO_PROMETHEUS, ids=lambda s: s[0])
def test_mapping_names_the_metrics_with_any_prefix_and_tags(statsd, prefix):
    """One mapping for every statsd_prefix (gunicorn's normalisation: one dot after it) and any
    dogstatsd_tags: the same name, the prefix as the `statsd_prefix` label, tags as labels."""
    name, kind = statsd
    want_name, want_labels = STATSD_TO_PROMETHEUS[statsd]
    full = metrics.statsd_prefix(prefix) + name
    for tags, tag_labels in (
        ("", {}),
        ("|#env:prod,role:canary", {"env": "prod", "role": "canary"}),
    ):
        [series] = mapper().series(f"{full}:1|{STATSD_LINE_TYPES[kind]}{tags}")
        assert series.mapped and (series.name, series.kind) == (want_name, kind)
        prefix_label = {"statsd_prefix": prefix} if prefix else {}
        assert scraped_labels(series.labels) == {**want_labels, **prefix_label, **tag_labels}


def test_mapping_leaves_other_metrics_and_types_alone():
    for line in ("vrypt.rps:1|c", "gunicorn.requests:1|g", "xvrypt.rps:1|g", "vrypt.rps.x:1|g"):
        [series] = mapper().series(line)
        assert not series.mapped, line


def test_mapping_names_are_valid_prometheus_names():
    for mapping in mapping_config()["mappings"]:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", mapping["name"])
        if mapping.get("match_metric_type") == "counter":
            assert mapping["name"].endswith("_total")


def go_seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def test_gauge_ttl_follows_the_interval(monkeypatch):
    """Every gauge is sent every VRYPT_STATSD_INTERVAL; the exporter forgets it after `ttl`.
    A ttl shorter than a few intervals makes the gauge blink out between two sends (issue 15:
    15 s against a 20 s interval); the counters keep no ttl (rate() needs them to persist)."""
    env = container_env(MAIN)
    monkeypatch.setenv("VRYPT_STATSD_INTERVAL", env.get("VRYPT_STATSD_INTERVAL", ""))
    interval = metrics.interval_from_env()
    for mapping in mapping_config()["mappings"]:
        if mapping["name"] in GAUGES:
            assert go_seconds(mapping["ttl"]) >= 5 * interval, mapping
        else:
            assert "ttl" not in mapping, mapping
    assert {m["name"] for m in mapping_config()["mappings"] if "ttl" in m} == GAUGES


def test_mapping_help_says_what_is_counted():
    helps = {m["name"]: " ".join(m["help"].split()) for m in mapping_config()["mappings"]}
    for status in ("408", "414", "431", "400"):
        assert status in helps["vrypt_bad_requests_total"]
    assert "pusher" in helps["gunicorn_requests_total"]
    assert "VRYPT_STATSD_INTERVAL" in helps["vrypt_requests_per_second"]
    assert "every interval" in helps["gunicorn_workers"]


# --- deploy/Dockerfile --------------------------------------------------------------------------


class Stage:
    def __init__(self, image: str, name: str | None):
        self.image, self.name = image, name
        self.instructions: list[tuple[str, str]] = []
        self.workdir = "/"


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            keyword, _, rest = current.strip().partition(" ")
            lines.append((keyword.upper(), rest.strip()))
        current = ""
    return lines


def dockerfile_stages() -> list[Stage]:
    args, stages = {}, []
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        else:
            stages[-1].instructions.append((keyword, rest))
            if keyword == "WORKDIR":
                stages[-1].workdir = os.path.join(stages[-1].workdir, rest)
    return stages


def dockerfile_cmd() -> list[str]:
    [cmd] = [rest for keyword, rest in dockerfile_stages()[-1].instructions if keyword == "CMD"]
    assert cmd.startswith("["), "CMD must be exec form, so SIGTERM reaches gunicorn"
    return json.loads(cmd)


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(stage copied from or None for the build context, sources, destination) of each COPY/ADD."""
    found = []
    for keyword, rest in stage.instructions:
        if keyword in ("COPY", "ADD"):
            words = shlex.split(rest)
            origin = [w.partition("=")[2] for w in words if w.startswith("--from=")]
            paths = [w for w in words if not w.startswith("--")]
            found.append((origin[0] if origin else None, paths[:-1], paths[-1]))
    return found


def copy_sources(stage: Stage) -> list[str]:
    """What a stage copies from the build context."""
    return [source for origin, sources, _ in copies(stage) if origin is None for source in sources]


def test_dockerfile_is_multi_stage_on_slim_python():
    stages = dockerfile_stages()
    assert len(stages) == 2
    for stage in stages:
        match = re.fullmatch(r"python:3\.(\d+)(\.\d+)?-slim(-\w+)?", stage.image)
        assert match and int(match.group(1)) >= 11, stage.image
    assert stages[0].name == "build"


def test_dockerfile_builds_a_wheel_then_installs_only_it():
    build, runtime = dockerfile_stages()
    build_runs = " ".join(rest for keyword, rest in build.instructions if keyword == "RUN")
    match = re.search(r"(\S+)/bin/pip wheel --wheel-dir (\S+) \.", build_runs)
    assert match
    venv, wheel_dir = match.groups()
    # Into a venv: a distribution's python3 refuses pip installs (PEP 668, issue 26).
    assert f"python3 -m venv {venv}" in build_runs
    assert f"{venv}/bin/pip install --no-index --find-links={wheel_dir} vrypt-worker" in build_runs
    # The runtime stage installs nothing: it copies the venv, and only it, from the build stage
    # (COPY --from, which every builder has; RUN --mount is BuildKit's and recent buildah's).
    assert not [rest for keyword, rest in runtime.instructions if "pip" in rest]
    assert [(o, s, d) for o, s, d in copies(runtime) if o] == [(build.name, [venv], venv)]
    # The source tree never reaches the runtime image, only conf/.
    assert copy_sources(runtime) == ["conf/"]


def test_dockerfile_copies_paths_that_exist():
    for stage in dockerfile_stages():
        for source in copy_sources(stage):
            assert (ROOT / source).exists(), f"{source} (COPY in deploy/Dockerfile) is missing"
    assert (ROOT / "conf" / "gunicorn.conf.py").exists()


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**"
    for stage in dockerfile_stages():
        for source in copy_sources(stage):
            assert f"!{source}" in patterns, source


def test_dockerfile_runs_gunicorn_as_a_non_root_user():
    runtime = dockerfile_stages()[-1]
    [user] = [rest for keyword, rest in runtime.instructions if keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets runAsNonRoot verify it"
    assert int(uid) == POD_SPEC["securityContext"]["runAsUser"]
    assert int(gid) == POD_SPEC["securityContext"]["runAsGroup"]
    assert dockerfile_cmd() == ["gunicorn", "-c", "conf/gunicorn.conf.py"]
    assert not [k for k, _ in runtime.instructions if k == "ENTRYPOINT"]
    exposed = [rest for keyword, rest in runtime.instructions if keyword == "EXPOSE"]
    assert exposed == [str(resolve_port(MAIN, "http"))]


# --- deploy/systemd -----------------------------------------------------------------------------


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(SYSTEMD / name)
    return unit


def test_systemd_units_use_socket_activation_with_the_project_config():
    socket, service = read_unit("vrypt.socket"), read_unit("vrypt.service")
    assert socket["Socket"]["ListenStream"] == "8080"
    assert "vrypt.socket" in service["Unit"]["Requires"]
    exec_start = shlex.split(service["Service"]["ExecStart"])
    assert exec_start[0].endswith("/gunicorn")
    assert exec_start[1:3] == ["-c", "conf/gunicorn.conf.py"]
    assert service["Service"]["Type"] == "notify"
    # gunicorn ignores systemd's socket when each worker binds its own (reuse_port).
    assert service["Service"]["Environment"] == "VRYPT_REUSE_PORT=0"
    assert service["Service"]["KillMode"] == "mixed"
    assert int(service["Service"]["TimeoutStopSec"]) > 30  # graceful_timeout
    Config().parser().parse_args(exec_start[1:])


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    shutil.copy(SYSTEMD / "vrypt.socket", tmp_path)
    service = (SYSTEMD / "vrypt.service").read_text()
    # verify insists that ExecStart's binary exists: point it at this environment's gunicorn.
    gunicorn = shutil.which("gunicorn") or str(Path(sys.executable).with_name("gunicorn"))
    (tmp_path / "vrypt.service").write_text(
        re.sub(r"^ExecStart=\S+", f"ExecStart={gunicorn}", service, flags=re.M)
    )
    units = [str(tmp_path / "vrypt.socket"), str(tmp_path / "vrypt.service")]
    result = run([SYSTEMD_ANALYZE, "verify", "--man=no", *units])
    assert result.returncode == 0, result.stderr
    assert "vrypt" not in result.stderr, result.stderr


# --- docs/deploy.md -----------------------------------------------------------------------------


def test_deploy_doc_has_the_commands_and_metric_names():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for text in (
        "docker build -f deploy/Dockerfile",
        "kubectl apply -k deploy/k8s",
        "net.ipv4.tcp_migrate_req",
        *sorted({name for name, _ in STATSD_TO_PROMETHEUS.values()}),
    ):
        assert text in doc, text


def test_docs_say_what_a_prefix_does_and_give_the_queries():
    """Issue 15: what a prefix does, and the PromQL for the RPS of a pod, of the Deployment and
    per worker, in both documents an operator reads."""
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    for doc in (deploy_doc, metrics_doc):
        assert "statsd_prefix" in doc and "dogstatsd" in doc.lower()
        assert "sum by (pod) (vrypt_requests_per_second)" in doc
        assert "/ sum by (pod) (gunicorn_workers)" in doc
        assert re.search(r"sum\(vrypt_requests_per_second\{pod=~", doc)
