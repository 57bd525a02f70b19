"""deploy/k8s: every manifest validates against its schema, and the pieces fit together.

Built-in kinds are checked with kubernetes-validate's bundled (offline) Kubernetes JSON schemas in
strict mode, so unknown fields fail too. The ServiceMonitor is a custom resource: it is checked
against a vendored subset of its CRD schema (tests/fixtures/k8s/servicemonitor-v1.schema.yaml says
where it comes from), which reuses Kubernetes' ObjectMeta and LabelSelector definitions. What no
schema can see (selectors that match, ports that exist, probes on the right paths, settings the
service understands) is checked across the manifests below.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from clip_runtime.registry import DEFAULT_MODELS
from clip_runtime.settings import ClipSettings

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
SERVICEMONITOR_SCHEMA = Path(__file__).parent / "fixtures" / "k8s" / "servicemonitor-v1.schema.yaml"

# The oldest Kubernetes minor the manifests promise to work on, and the newest schemas bundled.
KUBERNETES_VERSIONS = ("1.28", "1.37")
BUILT_IN_KINDS = (
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
)
ADAPTER_DIR = K8S_DIR / "prometheus-adapter"
CUSTOM_KINDS = ("ServiceMonitor",)


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def _load_manifests() -> dict[str, dict[str, Any]]:
    """kind -> object, one object per file."""
    manifests: dict[str, dict[str, Any]] = {}
    for path in _manifest_files():
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(documents) == 1, f"{path.name}: one object per file"
        (document,) = documents
        assert document["kind"] not in manifests, f"two manifests of kind {document['kind']}"
        manifests[document["kind"]] = document
    return manifests


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return _load_manifests()


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _servicemonitor_validator(version: str) -> jsonschema.Draft202012Validator:
    """The vendored CRD subset, with Kubernetes' definitions (for ObjectMeta, LabelSelector)."""
    schema = yaml.safe_load(SERVICEMONITOR_SCHEMA.read_text())
    (folder,) = (
        entry
        for entry in (resources.files("kubernetes_validate") / "kubernetes-json-schema").iterdir()
        if entry.name.startswith(f"v{version}.") and entry.name.endswith("-local-strict")
    )
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry: Registry = Registry().with_resources(
        [
            (definitions["$id"], Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


# -- schemas ----------------------------------------------------------------------------------


def test_every_manifest_kind_has_a_schema_check(manifests: dict[str, dict[str, Any]]) -> None:
    # A new manifest must come with its validation: no kind goes unchecked by accident.
    assert set(manifests) == set(BUILT_IN_KINDS) | set(CUSTOM_KINDS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kind", BUILT_IN_KINDS)
def test_built_in_kinds_match_the_kubernetes_schema(
    manifests: dict[str, dict[str, Any]], kind: str, version: str
) -> None:
    validated = kubernetes_validate.validate(manifests[kind], version, strict=True)
    assert validated == version  # the schemas of that very version were used


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_servicemonitor_matches_its_crd_schema(
    manifests: dict[str, dict[str, Any]], version: str
) -> None:
    _servicemonitor_validator(version).validate(manifests["ServiceMonitor"])


def test_the_kubernetes_schemas_reject_mistakes(manifests: dict[str, dict[str, Any]]) -> None:
    """The validation above is not vacuous: a misspelt field or a wrong type fails it."""
    version = KUBERNETES_VERSIONS[-1]
    misspelt = copy.deepcopy(manifests["Deployment"])
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(misspelt, version, strict=True)

    mistyped = copy.deepcopy(manifests["HorizontalPodAutoscaler"])
    mistyped["spec"]["maxReplicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, version, strict=True)


def test_the_servicemonitor_schema_rejects_mistakes(manifests: dict[str, dict[str, Any]]) -> None:
    validator = _servicemonitor_validator(KUBERNETES_VERSIONS[-1])
    good = manifests["ServiceMonitor"]

    misspelt = copy.deepcopy(good)
    misspelt["spec"]["endpoints"][0]["intervall"] = "15s"
    bad_duration = copy.deepcopy(good)
    bad_duration["spec"]["endpoints"][0]["interval"] = "15 seconds"
    no_selector = copy.deepcopy(good)
    del no_selector["spec"]["selector"]
    bad_metadata = copy.deepcopy(good)
    bad_metadata["metadata"]["lables"] = {"a": "b"}
    for broken in (misspelt, bad_duration, no_selector, bad_metadata):
        assert not validator.is_valid(broken), broken


# -- the pieces fit together ------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def test_service_routes_to_the_deployment_pods(manifests: dict[str, dict[str, Any]]) -> None:
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(service["spec"]["selector"], pod_labels)

    ports = _container(manifests)["ports"]
    container_ports = {port["name"]: port["containerPort"] for port in ports}
    assert container_ports == {"http": 3000}  # BentoML serves on 3000 (the image EXPOSEs it)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports


def test_servicemonitor_scrapes_the_service(manifests: dict[str, dict[str, Any]]) -> None:
    service, monitor = manifests["Service"], manifests["ServiceMonitor"]
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        # The operator rejects a scrape timeout longer than the interval.
        assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(int(number) * units[unit] for number, unit in parts)


def test_hpa_scales_the_deployment_on_requested_resources(
    manifests: dict[str, dict[str, Any]],
) -> None:
    hpa, deployment = manifests["HorizontalPodAutoscaler"], manifests["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    requests = _container(manifests)["resources"]["requests"]
    for metric in hpa["spec"]["metrics"]:
        # Utilization is a share of the request: without one the HPA cannot compute it.
        assert metric["type"] == "Resource"
        assert metric["resource"]["name"] in requests


def test_pods_get_a_gpu_and_probes_on_bentoml_health_paths(
    manifests: dict[str, dict[str, Any]],
) -> None:
    container = _container(manifests)
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # Extended resources cannot be overcommitted: Kubernetes refuses a request below the limit.
    assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == "1"
    assert set(limits) >= {"cpu", "memory", "nvidia.com/gpu"}

    probes = {name: container[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in (*probes.values(), container["startupProbe"]["httpGet"]):
        assert probe["port"] == "http"


def test_pod_environment_is_valid_service_settings(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {item["name"]: item["value"] for item in _container(manifests)["env"]}
    clip_env = {name: value for name, value in env.items() if name.startswith("CLIP_")}
    # ClipSettings ignores unknown CLIP_* variables, so a misspelt one would do nothing silently.
    known = {f"CLIP_{field.upper()}" for field in ClipSettings.model_fields}
    assert set(clip_env) <= known, set(clip_env) - known

    for name in known:
        monkeypatch.delenv(name, raising=False)
    for name, value in clip_env.items():
        monkeypatch.setenv(name, value)
    settings = ClipSettings()  # raises on a value the service would refuse at start
    assert set(settings.models) <= set(DEFAULT_MODELS)
    assert settings.device == "cuda"  # fail on a pod without a GPU rather than serve on CPU
    assert settings.decode_workers <= float(_container(manifests)["resources"]["requests"]["cpu"])


def test_kustomization_applies_every_manifest_and_names_the_image(
    manifests: dict[str, dict[str, Any]],
) -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]
    image = _container(manifests)["image"]
    image_names = {entry["name"] for entry in kustomization["images"]}
    assert image.rsplit(":", 1)[0] in image_names  # else `images` would rewrite nothing


def test_pdb_covers_the_pods_without_blocking_drains(manifests: dict[str, dict[str, Any]]) -> None:
    pdb = manifests["PodDisruptionBudget"]["spec"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert _matches(pdb["selector"]["matchLabels"], pod_labels)
    # One pod at a time; `minAvailable` >= minReplicas would forbid every eviction at 1 replica.
    assert pdb == {**pdb, "maxUnavailable": 1} and "minAvailable" not in pdb


def test_shutdown_fits_the_grace_period(manifests: dict[str, dict[str, Any]]) -> None:
    """preStop sleep, then the serve's bounded drain, inside terminationGracePeriodSeconds with
    room for the model worker to stop; the drain lasts as long as the latency budget."""
    container = _container(manifests)
    args = container["args"]
    drain_s = int(args[args.index("--timeout-graceful-shutdown") + 1])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = int(command[1])
    grace_s = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop_s >= 5  # endpoints and load balancers need a few seconds to stop routing
    assert grace_s >= pre_stop_s + drain_s + 30
    env = {item["name"]: item["value"] for item in container["env"]}
    latency_ms = int(
        env.get("CLIP_MAX_LATENCY_MS", ClipSettings.model_fields["max_latency_ms"].default)
    )
    assert drain_s * 1000 >= latency_ms  # accepted requests get their whole budget


def test_egress_is_dns_and_public_http_only(manifests: dict[str, dict[str, Any]]) -> None:
    policy = manifests["NetworkPolicy"]["spec"]
    pod_labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert _matches(policy["podSelector"]["matchLabels"], pod_labels)
    assert policy["policyTypes"] == ["Egress"]
    dns, web = policy["egress"]
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    (resolver,) = dns["to"]
    assert resolver["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {(p["protocol"], p["port"]) for p in web["ports"]} == {("TCP", 443), ("TCP", 80)}
    (public,) = web["to"]
    # What the service refuses for hosts off the allow-list is unreachable at the network too.
    assert set(public["ipBlock"]["except"]) >= {
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "127.0.0.0/8",
    }


def _merge(base: Any, patch: Any) -> Any:
    """A strategic merge as far as the overlay needs it: maps merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in patch.items()}}
    return patch


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_prometheus_adapter_overlay_scales_on_requests_in_progress(
    manifests: dict[str, dict[str, Any]], version: str
) -> None:
    overlay = yaml.safe_load((ADAPTER_DIR / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    (patch_entry,) = overlay["patches"]
    patch = yaml.safe_load((ADAPTER_DIR / patch_entry["path"]).read_text())
    base = manifests["HorizontalPodAutoscaler"]
    assert (patch["kind"], patch["metadata"]["name"]) == (base["kind"], base["metadata"]["name"])
    hpa = _merge(base, patch)
    assert kubernetes_validate.validate(hpa, version, strict=True) == version
    assert hpa["spec"]["behavior"] == base["spec"]["behavior"]  # only the metrics change

    (rule,) = yaml.safe_load((ADAPTER_DIR / "adapter-values.yaml").read_text())["rules"]["custom"]
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    assert pods_metrics == [rule["name"]["as"]]
    assert re.match(rule["name"]["matches"], ADAPTER_SERIES)
    assert rule["seriesQuery"].startswith(ADAPTER_SERIES + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# The series the adapter rule reads: tests/integration/test_metrics.py checks /metrics has it.
ADAPTER_SERIES = "bentoml_service_request_in_progress"
