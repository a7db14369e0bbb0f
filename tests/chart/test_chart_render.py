"""``helm template`` output, parsed and checked: what each Deployment runs and how,
what the Services expose, and what appears only when its value asks for it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import _build_parser, parse_labels
from gateway.config.load import load_config

from .conftest import CHART, CI_VALUES, NAMESPACE, REPO, Render, find, kinds

CI = CHART / "ci"
INGRESS = "edge-meshgate-ingressgateway"
EGRESS = "edge-meshgate-egressgateway"


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as a dict (every flag the chart passes has a value)."""
    out = {}
    for arg in args:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            assert sep, f"{arg!r} has no value"
            out[name] = value
    return out


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


def test_default_install_is_one_ingress_gateway(render: Render) -> None:
    docs = render()
    assert [d["metadata"]["name"] for d in kinds(docs, "Deployment")] == [INGRESS]
    assert kinds(docs, "StatefulSet") == []
    assert kinds(docs, "HorizontalPodAutoscaler") == []
    assert kinds(docs, "PodDisruptionBudget") == []
    # Only meshgate's own CRD by default; Istio's are opt-in.
    assert [d["metadata"]["name"] for d in kinds(docs, "CustomResourceDefinition")] == [
        "ratelimitpolicies.meshgate.io"
    ]
    image = container(find(docs, "Deployment"))["image"]
    assert image == "meshgate:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_ingress_runs_meshgate_with_the_labels_its_gateways_select(render: Render) -> None:
    deployment = find(render(), "Deployment", INGRESS)
    c = container(deployment)
    assert c["args"][:2] == ["run", "/etc/meshgate/config"]
    f = flags(c["args"])
    assert f["address"] == "0.0.0.0"
    assert f["admin-port"] == "15000"
    assert f["admin-address"] == "0.0.0.0"  # kubelet probes come from outside the pod
    assert parse_labels(f["labels"]) == {"istio": "ingressgateway"}
    assert f["namespace"] == NAMESPACE
    # Nothing to mount and no Redis: the flags that need them stay out.
    assert "credentials-dir" not in f
    assert "redis-url" not in f
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["istio"] == "ingressgateway"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert "istio" not in selector  # overridable, so kept out of the immutable selector


def test_gateway_labels_can_be_overridden(render: Render) -> None:
    docs = render(set=["labels.istio=public", "labels.team=edge"])
    c = container(find(docs, "Deployment", INGRESS))
    assert parse_labels(flags(c["args"])["labels"]) == {"istio": "public", "team": "edge"}
    svc = find(docs, "Service", INGRESS)
    assert svc["metadata"]["labels"]["istio"] == "public"


def test_probes_hit_readiness_on_the_admin_port(render: Render) -> None:
    c = container(find(render(), "Deployment", INGRESS))
    admin = [p for p in c["ports"] if p["name"] == "admin"]
    assert admin == [{"name": "admin", "containerPort": 15000, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz/ready", "port": "admin"}
    annotations = find(render(), "Deployment", INGRESS)["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15000"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_admin_port_value_moves_flag_probe_and_scrape_together(render: Render) -> None:
    deployment = find(render(set=["admin.port=9901"]), "Deployment", INGRESS)
    c = container(deployment)
    assert flags(c["args"])["admin-port"] == "9901"
    assert {"name": "admin", "containerPort": 9901, "protocol": "TCP"} in c["ports"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9901"


def test_pods_are_hardened(render: Render) -> None:
    pod = find(render(), "Deployment", INGRESS)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(find(render(), "Deployment", INGRESS))["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "add" not in sc["capabilities"]


def test_config_directory_is_mounted_whole_so_updates_reach_hot_reload(render: Render) -> None:
    docs = render()
    deployment = find(docs, "Deployment", INGRESS)
    c = container(deployment)
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/meshgate/config"
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    configmap = find(docs, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    # No checksum annotation: a config change must reload, not restart, the pods.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert not any("checksum" in key for key in annotations)


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_rendered_configuration_is_valid_meshgate_config(
    render: Render, values: Path | None, tmp_path: Path
) -> None:
    docs = render(*([values] if values else []))
    configmaps = kinds(docs, "ConfigMap")
    if values is not None and values.name == "existing-configmap-values.yaml":
        assert configmaps == []
        return
    (configmap,) = configmaps
    for key, text in configmap["data"].items():
        (tmp_path / key).write_text(text)
    model = load_config([str(tmp_path)])  # raises ConfigErrors with every problem
    assert model.resources


def test_existing_configmap_is_mounted_instead_of_one_from_values(render: Render) -> None:
    docs = render(CI / "existing-configmap-values.yaml")
    assert kinds(docs, "ConfigMap") == []
    volumes = find(docs, "Deployment", INGRESS)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": "edge-routes"}} in volumes


def test_credentials_are_mounted_per_secret_into_the_credentials_dir(render: Render) -> None:
    deployment = find(render(CI / "tls-values.yaml"), "Deployment", INGRESS)
    c = container(deployment)
    assert flags(c["args"])["credentials-dir"] == "/etc/meshgate/credentials"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for secret in ("edge-cert", "api.example.com"):
        mount = mounts[f"/etc/meshgate/credentials/{secret}"]
        assert mount["readOnly"] is True
        assert "subPath" not in mount  # rotated certificates must show up in place
        assert volumes[mount["name"]]["secret"]["secretName"] == secret


def test_service_exposes_tcp_and_the_udp_twin_for_http3(render: Render) -> None:
    docs = render()
    svc = find(docs, "Service", INGRESS)
    assert svc["spec"]["type"] == "LoadBalancer"
    ports = {(p["port"], p["protocol"]): p for p in svc["spec"]["ports"]}
    assert set(ports) == {(80, "TCP"), (443, "TCP"), (443, "UDP")}
    assert ports[443, "UDP"]["name"] == "http3"
    assert all(p["targetPort"] == p["port"] for p in ports.values())
    deployment = find(docs, "Deployment", INGRESS)
    assert svc["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    container_ports = {(p["containerPort"], p["protocol"]) for p in container(deployment)["ports"]}
    assert container_ports >= set(ports)
    # Binding 80/443 as non-root without any capability relies on this sysctl.
    sysctls = deployment["spec"]["template"]["spec"]["securityContext"]["sysctls"]
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in sysctls


def test_service_settings_come_from_values(render: Render) -> None:
    svc = find(render(CI / "hpa-values.yaml"), "Service", INGRESS)
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-type": "nlb"
    }
    cluster_ip = find(render(CI / "ingress-only-values.yaml"), "Service", INGRESS)
    assert cluster_ip["spec"]["type"] == "ClusterIP"
    # externalTrafficPolicy is only valid for NodePort/LoadBalancer Services.
    docs = render(CI / "ingress-only-values.yaml", set=["service.externalTrafficPolicy=Local"])
    assert "externalTrafficPolicy" not in find(docs, "Service", INGRESS)["spec"]


def test_hpa_and_pdb_appear_when_enabled(render: Render) -> None:
    docs = render(CI / "hpa-values.yaml")
    deployment = find(docs, "Deployment", INGRESS)
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    hpa = find(docs, "HorizontalPodAutoscaler", INGRESS)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": INGRESS,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    targets = {
        m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
        for m in hpa["spec"]["metrics"]
    }
    assert targets == {"cpu": 70, "memory": 80}
    pdb = find(docs, "PodDisruptionBudget", INGRESS)
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert (
        spread[0]["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )


def test_replicas_and_placement_values_reach_the_pod(render: Render) -> None:
    docs = render(
        set=[
            "replicaCount=3",
            "nodeSelector.pool=edge",
            "tolerations[0].key=dedicated",
            "tolerations[0].operator=Exists",
            "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution=null",
            "resources.limits.cpu=2",
            "podDisruptionBudget.enabled=true",
            "podDisruptionBudget.maxUnavailable=1",
        ]
    )
    deployment = find(docs, "Deployment", INGRESS)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 3
    assert pod["nodeSelector"] == {"pool": "edge"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert container(deployment)["resources"]["limits"]["cpu"] == 2
    pdb = find(docs, "PodDisruptionBudget", INGRESS)["spec"]
    assert pdb["maxUnavailable"] == 1
    assert "minAvailable" not in pdb  # the two are exclusive


def test_egress_gateway_and_redis_when_enabled(render: Render) -> None:
    docs = render(CI / "ingress-egress-redis-values.yaml")
    egress = find(docs, "Deployment", EGRESS)
    ingress = find(docs, "Deployment", INGRESS)
    assert egress["spec"]["replicas"] == 2
    f = flags(container(egress)["args"])
    assert parse_labels(f["labels"]) == {"istio": "egressgateway"}
    assert egress["spec"]["template"]["metadata"]["labels"]["istio"] == "egressgateway"
    assert container(egress)["resources"]["requests"] == {"cpu": "50m", "memory": "96Mi"}
    assert container(ingress)["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert egress["spec"]["selector"] != ingress["spec"]["selector"]
    assert find(docs, "Service", EGRESS)["spec"]["type"] == "ClusterIP"

    redis = find(docs, "StatefulSet", "edge-meshgate-redis")
    redis_svc = find(docs, "Service", "edge-meshgate-redis")
    assert redis["spec"]["serviceName"] == redis_svc["metadata"]["name"]
    assert redis_svc["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    url = f"redis://edge-meshgate-redis.{NAMESPACE}.svc:6379/0"
    for deployment in (ingress, egress):
        assert flags(container(deployment)["args"])["redis-url"] == url
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert redis_container["securityContext"]["readOnlyRootFilesystem"] is True


def test_external_redis_url_is_passed_through(render: Render) -> None:
    docs = render(CI / "tls-values.yaml")
    c = container(find(docs, "Deployment", INGRESS))
    assert flags(c["args"])["redis-url"] == "redis://redis.infra.svc:6379/0"
    assert kinds(docs, "StatefulSet") == []


def test_ingress_can_be_turned_off_for_an_egress_only_release(render: Render) -> None:
    docs = render(set=["ingress.enabled=false", "egress.enabled=true"])
    assert [d["metadata"]["name"] for d in kinds(docs, "Deployment")] == [EGRESS]
    assert [d["metadata"]["name"] for d in kinds(docs, "Service")] == [EGRESS]


def test_istio_crds_are_opt_in_and_kept_on_uninstall(render: Render) -> None:
    docs = render(set=["istioCRDs.enabled=true"])
    crds = {d["metadata"]["name"]: d for d in kinds(docs, "CustomResourceDefinition")}
    assert set(crds) == {
        "ratelimitpolicies.meshgate.io",
        "gateways.networking.istio.io",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "serviceentries.networking.istio.io",
        "requestauthentications.security.istio.io",
        "authorizationpolicies.security.istio.io",
    }
    for name, crd in crds.items():
        if name.endswith("istio.io"):
            assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_pods_keep_serving_briefly_before_sigterm(render: Render) -> None:
    deployment = find(render(), "Deployment", INGRESS)
    pod = deployment["spec"]["template"]["spec"]
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["sleep", "5"]
    # The sleep and meshgate's drain must both fit in the grace period.
    assert int(command[1]) < pod["terminationGracePeriodSeconds"]
    off = find(render(set=["preStopSleepSeconds=0"]), "Deployment", INGRESS)
    assert "lifecycle" not in container(off)


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_rendered_command_line_is_one_meshgate_accepts(
    render: Render, values: Path | None
) -> None:
    # The chart and the CLI live in one repository; a renamed flag must fail here, not
    # in a crash-looping pod.
    for deployment in kinds(render(*([values] if values else [])), "Deployment"):
        args = container(deployment)["args"]
        try:
            parsed = _build_parser().parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"meshgate refuses {args}: exit {exc.code}")
        assert parsed.address == "0.0.0.0"
        assert parsed.namespace == NAMESPACE
