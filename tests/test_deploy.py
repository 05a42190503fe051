"""``deploy/``: the kustomize base and its CPU and GPU overlays render, validate offline against
the Kubernetes schemas shipped inside ``kubernetes-validate``, and say what the server and the
bridge actually do (probe ports, flags and SIE_* variables that are real settings, a grace period
that covers the drain); the Envoy example parses as an Envoy bootstrap and balances gRPC over the
headless Service with gRPC health checks.

Rendering: ``kubectl kustomize`` where ``kubectl`` is on PATH, else ``tests/kustomize_render.py``
(a small renderer for the subset ``deploy/`` uses); where both exist they must agree.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml
from aiohttp import web
from sie_bridge import config as bridge_config
from sie_bridge.routes import ops as bridge_ops
from sie_sdk.prometheus import HELP as METRIC_HELP
from sie_sdk.targets import grpc_target
from sie_server import config as server_config
from sie_server.catalog import load_catalog

from tests.kustomize_render import (
    PatchFailed,
    Resource,
    UnsupportedKustomization,
    apply_json6902,
    render,
    resource_id,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TARGETS = {
    "base": DEPLOY / "base",
    "cpu": DEPLOY / "overlays" / "cpu",
    "gpu": DEPLOY / "overlays" / "gpu",
}
QUEUE_DEPTH_HPA = DEPLOY / "examples" / "hpa-queue-depth.yaml"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
#: The oldest Kubernetes the manifests target (native gRPC probes are GA from 1.27).
OLDEST_K8S = "1.27"
#: Time past drain + grace for stopping the engine and the metrics endpoint.
SHUTDOWN_MARGIN_S = 10.0
#: Environment variables the containers set that are not SIE settings (caches on the volume).
NON_SIE_ENV = {"HOME", "HF_HOME"}
SERVER, BRIDGE = "sie-server", "sie-bridge"
HEADLESS = "sie-server-headless"
EXPECTED = {
    ("ConfigMap", "sie-server-config"),
    ("ConfigMap", "sie-bridge-config"),
    ("Deployment", SERVER),
    ("Deployment", BRIDGE),
    ("Service", HEADLESS),
    ("Service", BRIDGE),
    ("PodDisruptionBudget", SERVER),
    ("PodDisruptionBudget", BRIDGE),
    ("HorizontalPodAutoscaler", SERVER),
}


# ---- rendering ----------------------------------------------------------------------------


def kubectl_render(directory: Path) -> list[Resource]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@functools.cache
def _rendered(target: str) -> tuple[Resource, ...]:
    directory = TARGETS[target]
    docs = kubectl_render(directory) if shutil.which("kubectl") else render(directory)
    return tuple(docs)


def rendered(target: str) -> list[Resource]:
    """The target's resources (a fresh copy: tests may not change the cache)."""
    return copy.deepcopy(list(_rendered(target)))


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(resources: list[Resource], name: str) -> dict[str, Any]:
    pod = find(resources, "Deployment", name)["spec"]["template"]["spec"]
    matches: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == name]
    assert len(matches) == 1
    return matches[0]


def environment(resources: list[Resource], name: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then env."""
    spec = container(resources, name)
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        config_map = find(resources, "ConfigMap", source["configMapRef"]["name"])
        env.update(config_map["data"])
    for var in spec.get("env", []):
        assert "value" in var, f"{var['name']}: only literal values are used"
        env[var["name"]] = var["value"]
    return env


def server_settings(resources: list[Resource]) -> server_config.Settings:
    spec = container(resources, SERVER)
    return server_config.load_settings(spec["args"], environment(resources, SERVER))


def bridge_settings(resources: list[Resource]) -> bridge_config.BridgeSettings:
    spec = container(resources, BRIDGE)
    return bridge_config.load_settings(spec["args"], environment(resources, BRIDGE))


def container_port(spec: dict[str, Any], port: int | str) -> int:
    """A container port by number or by name."""
    for entry in spec["ports"]:
        if port in (entry["containerPort"], entry.get("name")):
            return int(entry["containerPort"])
    raise AssertionError(f"container {spec['name']} has no port {port!r}")


def pod_labels(resources: list[Resource], name: str) -> dict[str, str]:
    labels: dict[str, str] = find(resources, "Deployment", name)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (_UNITS[unit] if unit else 1)


def option_flags(options: tuple[tuple[str, Any, str], ...]) -> set[str]:
    return {f"--{name}" for name, _, _ in options}


def option_env(options: tuple[tuple[str, Any, str], ...], prefix: str) -> dict[str, str]:
    """Environment variable -> Settings attribute."""
    return {
        prefix + name.upper().replace("-", "_"): name.replace("-", "_") for name, _, _ in options
    }


# ---- the renderer -------------------------------------------------------------------------


def test_renderer_matches_kubectl_kustomize() -> None:
    """The offline renderer gives exactly what kustomize gives, so the tests prove the same
    thing with or without kubectl."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: nothing to compare the offline renderer with")
    for directory in TARGETS.values():
        ours = {resource_id(r): r for r in render(directory)}
        theirs = {resource_id(r): r for r in kubectl_render(directory)}
        assert ours == theirs, directory


def test_json6902_operations() -> None:
    doc = {"a": {"b": [1, 2], "c/d": 0, "e~f": 0}}
    patched = apply_json6902(
        doc,
        [
            {"op": "test", "path": "/a/b/0", "value": 1},
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "add", "path": "/a/b/0", "value": 0},
            {"op": "replace", "path": "/a/c~1d", "value": 1},
            {"op": "remove", "path": "/a/e~0f"},
            {"op": "add", "path": "/a/new", "value": {"x": 1}},
        ],
    )
    assert patched == {"a": {"b": [0, 1, 2, 3], "c/d": 1, "new": {"x": 1}}}
    assert doc == {"a": {"b": [1, 2], "c/d": 0, "e~f": 0}}  # the input is untouched
    with pytest.raises(PatchFailed, match="test failed"):
        apply_json6902(doc, [{"op": "test", "path": "/a/b/0", "value": 2}])
    with pytest.raises(PatchFailed, match="nothing at"):
        apply_json6902(doc, [{"op": "replace", "path": "/a/missing", "value": 1}])
    with pytest.raises(UnsupportedKustomization, match="move"):
        apply_json6902(doc, [{"op": "move", "from": "/a/b", "path": "/a/c"}])


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {A: a}\n"
    )
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\nnamePrefix: p-\n")
    with pytest.raises(UnsupportedKustomization, match="namePrefix"):
        render(tmp_path)
    (tmp_path / "smp.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- path: smp.yaml\n  target: {kind: ConfigMap, name: x}\n"
    )
    with pytest.raises(UnsupportedKustomization, match="JSON 6902"):
        render(tmp_path)
    (tmp_path / "op.yaml").write_text("- {op: replace, path: /data/A, value: b}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- path: op.yaml\n  target: {kind: ConfigMap, name: y}\n"
    )
    with pytest.raises(PatchFailed, match="no resource matches"):
        render(tmp_path)


# ---- schemas --------------------------------------------------------------------------------


_PROBE = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe"}}


@functools.cache
def _schema_versions() -> tuple[str, ...]:
    """The oldest targeted and the newest bundled Kubernetes versions; a skip (with the reason)
    only when kubernetes-validate cannot load the schemas it ships."""
    try:
        latest = ".".join(kubernetes_validate.utils.latest_version().split(".")[:2])
        for version in (OLDEST_K8S, latest):
            kubernetes_validate.validate(_PROBE, version, strict=True)
    except (
        OSError,
        IndexError,
        kubernetes_validate.utils.SchemaNotFoundError,
        kubernetes_validate.utils.VersionNotSupportedError,
        kubernetes_validate.utils.InvalidSchemaError,
    ) as exc:  # pragma: no cover - a broken install
        pytest.skip(f"kubernetes-validate cannot load its bundled schemas offline: {exc!r}")
    return OLDEST_K8S, latest


def validate(resource: Resource) -> None:
    """Strict schema validation (unknown fields are errors too, so a misspelt field cannot
    pass) against every version of ``_schema_versions``."""
    for version in _schema_versions():
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_manifests_validate_against_kubernetes_schemas(target: str) -> None:
    resources = rendered(target)
    assert {(r["kind"], r["metadata"]["name"]) for r in resources} == EXPECTED
    for resource in resources:
        validate(resource)


def test_queue_depth_hpa_example_validates_and_names_a_real_metric() -> None:
    (hpa,) = [doc for doc in yaml.safe_load_all(QUEUE_DEPTH_HPA.read_text()) if doc]
    validate(hpa)
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["metric"]["name"] for m in pods_metrics] == ["sie_queue_depth"]
    assert "sie_queue_depth" in METRIC_HELP  # the series the server's /metrics exposes
    base_hpa = find(rendered("base"), "HorizontalPodAutoscaler", SERVER)
    assert hpa["spec"]["scaleTargetRef"] == base_hpa["spec"]["scaleTargetRef"]


def test_validation_rejects_a_broken_manifest() -> None:
    """The schema check has teeth: a misspelt probe field and a string port both fail."""
    deployment = find(rendered("base"), "Deployment", SERVER)
    validate(deployment)
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"] = {"prot": 50051}
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        validate(deployment)
    # Native gRPC probes take a port number, not a name.
    probe["grpc"] = {"port": "grpc"}
    with pytest.raises(kubernetes_validate.ValidationError, match="grpc"):
        validate(deployment)


# ---- the server ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_server_probes_are_native_grpc_on_the_health_service(target: str) -> None:
    resources = rendered(target)
    spec = container(resources, SERVER)
    settings = server_settings(resources)
    assert container_port(spec, "grpc") == settings.port == 50051
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = spec[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == settings.port, kind
        # No service name: grpc.health.v1 Check("") is the overall status the server sets
        # (NOT_SERVING during preload and drain).
        assert probe["grpc"].get("service", "") == "", kind
    # The startup probe outlasts a slow preload; liveness gives up later than readiness.
    startup = spec["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    live, ready = spec["livenessProbe"], spec["readinessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        > ready["periodSeconds"] * ready["failureThreshold"]
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_grace_period_covers_the_drain(target: str) -> None:
    resources = rendered(target)
    settings = server_settings(resources)
    pod = find(resources, "Deployment", SERVER)["spec"]["template"]["spec"]
    needed = settings.drain_delay_s + settings.grace_period_s + SHUTDOWN_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert "lifecycle" not in container(resources, SERVER)  # the server handles SIGTERM itself


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_server_flags_and_env_are_real_settings(target: str) -> None:
    resources = rendered(target)
    spec = container(resources, SERVER)
    assert spec["command"] == ["python", "-m", "sie_server"]
    flags = {arg for arg in spec["args"] if arg.startswith("--")}
    assert flags <= option_flags(server_config._OPTIONS)
    env = environment(resources, SERVER)
    known = option_env(server_config._OPTIONS, "SIE_")
    sie_vars = {name for name in env if name.startswith("SIE_")}
    assert sie_vars <= set(known), sie_vars - set(known)
    assert set(env) - sie_vars <= NON_SIE_ENV
    # Every variable reaches its setting (no flag in args overrides one).
    settings = server_settings(resources)
    options = {name.replace("-", "_"): kind for name, kind, _ in server_config._OPTIONS}
    for var in sie_vars:
        attr = known[var]
        assert f"--{attr.replace('_', '-')}" not in flags, var
        value = getattr(settings, attr)
        if isinstance(value, tuple):
            assert value == tuple(options[attr](v) for v in env[var].split(",")), var
        else:
            assert value == options[attr](env[var]), var
    # The preloaded models exist in the built-in catalog, so the startup probe can succeed.
    catalog = load_catalog(settings.catalog_dirs)
    assert settings.preload
    assert all(name in catalog for name in settings.preload)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_metrics_port_is_annotated_for_prometheus(target: str) -> None:
    resources = rendered(target)
    settings = server_settings(resources)
    template = find(resources, "Deployment", SERVER)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert settings.metrics_port == 9090
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container_port(container(resources, SERVER), "metrics") == settings.metrics_port


def test_headless_service_for_client_side_round_robin() -> None:
    resources = rendered("base")
    service = find(resources, "Service", HEADLESS)["spec"]
    assert service["clusterIP"] == "None"
    assert service.get("publishNotReadyAddresses", False) is False
    assert selects(service["selector"], pod_labels(resources, SERVER))
    (port,) = service["ports"]
    spec = container(resources, SERVER)
    assert container_port(spec, port["targetPort"]) == server_settings(resources).port
    assert port["port"] == 50051


def test_disruption_budgets_and_autoscaler_target_the_deployments() -> None:
    resources = rendered("base")
    for name in (SERVER, BRIDGE):
        pdb = find(resources, "PodDisruptionBudget", name)["spec"]
        assert selects(pdb["selector"]["matchLabels"], pod_labels(resources, name))
        assert pdb["maxUnavailable"] == 1
    hpa = find(resources, "HorizontalPodAutoscaler", SERVER)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": SERVER,
    }
    assert hpa["spec"]["minReplicas"] >= 2  # one replica may drain while another serves
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    # The HPA owns the replica count: the Deployment does not set one that re-applying resets.
    assert "replicas" not in find(resources, "Deployment", SERVER)["spec"]


# ---- the bridge ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_bridge_targets_the_headless_service(target: str) -> None:
    resources = rendered(target)
    spec = container(resources, BRIDGE)
    assert spec["command"] == ["python", "-m", "sie_bridge"]
    flags = {arg for arg in spec["args"] if arg.startswith("--")}
    assert flags <= option_flags(bridge_config._OPTIONS)
    env = environment(resources, BRIDGE)
    known = option_env(bridge_config._OPTIONS, "SIE_BRIDGE_")
    assert set(env) <= set(known), set(env) - set(known)
    settings = bridge_settings(resources)
    kinds = {name.replace("-", "_"): kind for name, kind, _ in bridge_config._OPTIONS}
    for var, value in env.items():
        attr = known[var]
        assert f"--{attr.replace('_', '-')}" not in flags, var
        assert getattr(settings, attr) == kinds[attr](value), var
    # A gRPC DNS URI passes through the SDK's target parsing unchanged and names the headless
    # Service and its port.
    assert grpc_target(settings.backend) == settings.backend
    match = re.fullmatch(r"dns:///([a-z0-9-]+)(\.[a-z0-9.-]+)?:(\d+)", settings.backend)
    assert match is not None, settings.backend
    assert match.group(1) == HEADLESS
    (port,) = find(resources, "Service", HEADLESS)["spec"]["ports"]
    assert int(match.group(3)) == port["port"]


def test_bridge_probes_and_service() -> None:
    resources = rendered("base")
    spec = container(resources, BRIDGE)
    settings = bridge_settings(resources)
    assert container_port(spec, "http") == settings.port == 8080
    app = web.Application()
    bridge_ops.add_routes(app)
    routes = {route.resource.canonical for route in app.router.routes() if route.resource}
    for kind, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        probe = spec[kind]["httpGet"]
        assert probe["path"] == path
        assert path in routes  # the bridge serves it
        assert container_port(spec, probe["port"]) == settings.port
    service = find(resources, "Service", BRIDGE)["spec"]
    assert service.get("clusterIP") != "None"
    assert selects(service["selector"], pod_labels(resources, BRIDGE))
    (port,) = service["ports"]
    assert container_port(spec, port["targetPort"]) == settings.port
    pod = find(resources, "Deployment", BRIDGE)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= settings.request_timeout_s


# ---- the overlays -------------------------------------------------------------------------


def test_cpu_overlay_pins_cpu_and_requests_cpu() -> None:
    resources = rendered("cpu")
    assert server_settings(resources).device == "cpu"
    limits = container(resources, SERVER)["resources"]
    assert limits["requests"]["cpu"] == "2"
    assert "cpu" in limits["limits"]
    assert "nvidia.com/gpu" not in {**limits["requests"], **limits["limits"]}
    pod = find(resources, "Deployment", SERVER)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod


def test_gpu_overlay_asks_for_a_gpu() -> None:
    resources = rendered("gpu")
    assert server_settings(resources).device == "cuda"
    gpu = container(resources, SERVER)["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"
    base = container(rendered("base"), SERVER)["resources"]
    assert quantity_bytes(gpu["limits"]["memory"]) > quantity_bytes(base["limits"]["memory"])
    pod = find(resources, "Deployment", SERVER)["spec"]["template"]["spec"]
    assert pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    # The bridge needs no GPU.
    bridge = container(resources, BRIDGE)["resources"]
    assert "nvidia.com/gpu" not in {**bridge["requests"], **bridge["limits"]}


def test_base_pins_no_device() -> None:
    resources = rendered("base")
    assert server_settings(resources).device == "auto"
    assert "nvidia.com/gpu" not in container(resources, SERVER)["resources"]["limits"]


# ---- Envoy --------------------------------------------------------------------------------


def _envoy() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(ENVOY.read_text())
    return config


def test_envoy_balances_grpc_over_the_headless_service() -> None:
    config = _envoy()
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert "grpc_health_check" in check
    assert check["grpc_health_check"].get("service_name", "") == ""
    (locality,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = locality["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    (port,) = find(rendered("base"), "Service", HEADLESS)["spec"]["ports"]
    assert address["address"].split(".")[0] == HEADLESS
    assert address["port_value"] == port["port"]
    # Every route goes to that cluster; unary calls retry on UNAVAILABLE on another host.
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert {route["route"]["cluster"] for route in routes} == {cluster["name"]}
    retried = [
        route["route"]["retry_policy"] for route in routes if "retry_policy" in route["route"]
    ]
    assert retried
    for policy in retried:
        assert "unavailable" in policy["retry_on"].split(",")
        assert policy["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    # The health check window fits in the server's drain delay (still answering while it leaves).
    settings = server_settings(rendered("base"))
    window = check["unhealthy_threshold"] * float(check["interval"].rstrip("s"))
    assert window < settings.drain_delay_s


def test_envoy_config_parses_as_an_envoy_bootstrap() -> None:
    """Field names, enum values and typed_config types checked against Envoy's own protos (the
    xds-protos package); validation rules beyond the proto schema are not checked."""
    bootstrap_pb2 = pytest.importorskip(
        "envoy.config.bootstrap.v3.bootstrap_pb2",
        reason="xds-protos (Envoy's generated protos) is not installed: it is not a dev "
        "dependency, because it ships its own copy of opentelemetry's protos and breaks tracing",
    )
    json_format = importlib.import_module("google.protobuf.json_format")
    # Register the typed_config message types the file names.
    for module in (
        "envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2",
        "envoy.extensions.filters.http.router.v3.router_pb2",
        "envoy.extensions.upstreams.http.v3.http_protocol_options_pb2",
        "envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2",
    ):
        importlib.import_module(module)
    bootstrap = json_format.ParseDict(_envoy(), bootstrap_pb2.Bootstrap())
    (cluster,) = bootstrap.static_resources.clusters
    assert cluster.health_checks[0].HasField("grpc_health_check")
    broken = _envoy()
    broken["static_resources"]["clusters"][0]["health_checks"][0]["grpc_healthcheck"] = {}
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict(broken, bootstrap_pb2.Bootstrap())
