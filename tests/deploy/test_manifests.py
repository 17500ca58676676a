"""deploy/**: every kustomize base renders, every object is schema-valid, the security posture holds.

Rendering uses the kustomize subset in `kustomize.py`; validation uses `kubernetes-validate` (the
Kubernetes OpenAPI schemas shipped in the wheel, offline) in strict mode for Kubernetes 1.31, the
lowest version we promise. GatewayClass is a CRD the package does not know; its few fields are
checked by hand, as tests/waypoint/manager/test_schemas.py does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from ztunnel import config as zconfig
from ztunnel.drain import DEFAULT_DEADLINE

from .kustomize import build, object_id

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31"
BASES = ("manager", "controlplane", "ztunnel")
NAMESPACE = "ambient-system"
XDS_PORT = 15012  # istiod's xDS + CA gRPC port; what XDS_ADDRESS/CA_ADDRESS dial
ZTUNNEL_CAPS = {"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}
TOKEN_PATH = "/var/run/secrets/tokens/istio-token"

Object = dict[str, Any]


def _render(base: str) -> list[Object]:
    return build(DEPLOY / base if base else DEPLOY)


RENDERED = {base: _render(base) for base in (*BASES, "")}
ALL = RENDERED[""]


def _one(kind: str, name: str, objects: list[Object] = ALL) -> Object:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _ids(objects: list[Object]) -> list[str]:
    return ["/".join(p for p in object_id(o) if p) for o in objects]


DAEMONSET = _one("DaemonSet", "ztunnel")
POD = DAEMONSET["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e for e in CONTAINER["env"]}


# --- rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_kustomization_lists_every_manifest(base: str) -> None:
    kustomization = yaml.safe_load((DEPLOY / base / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / base).glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_top_level_is_all_bases_without_duplicates() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(BASES)
    assert sorted(_ids(ALL)) == sorted(i for b in BASES for i in _ids(RENDERED[b]))


@pytest.mark.parametrize("obj", ALL, ids=_ids(ALL))
def test_object_is_schema_valid(obj: Object) -> None:
    if obj["kind"] == "GatewayClass":
        assert obj["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}
        assert set(obj["spec"]) <= {"controllerName", "parametersRef", "description"}
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{'/'.join(object_id(obj))}: {path}: {exc.message}")


def test_the_validator_is_strict_about_daemonset_fields() -> None:
    bad = yaml.safe_load(yaml.safe_dump(DAEMONSET))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_namespaced_object_lives_in_a_namespace_that_is_installed() -> None:
    installed = {o["metadata"]["name"] for o in ALL if o["kind"] == "Namespace"}
    assert installed == {NAMESPACE}
    for obj in ALL:
        ns = obj["metadata"].get("namespace")
        assert ns in (None, NAMESPACE), _ids([obj])


def test_bindings_point_at_existing_roles_and_service_accounts() -> None:
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in ALL
        if o["kind"] == "ServiceAccount"
    }
    for binding in (o for o in ALL if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        ref = binding["roleRef"]
        role = _one(ref["kind"], ref["name"])
        if binding["kind"] == "RoleBinding" and role["kind"] == "Role":
            assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert (subject["namespace"], subject["name"]) in accounts, binding["metadata"]["name"]


# --- RBAC --------------------------------------------------------------------------------------


def _grants(role: Object) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


@pytest.mark.parametrize(
    "role",
    [o for o in ALL if o["kind"] in ("ClusterRole", "Role")],
    ids=_ids([o for o in ALL if o["kind"] in ("ClusterRole", "Role")]),
)
def test_no_wildcards_and_no_secrets(role: Object) -> None:
    for (group, resource), verbs in _grants(role).items():
        assert "*" not in {group, resource} | verbs, (group, resource, verbs)
        assert resource != "secrets", "nothing here reads secrets from the API"
        assert not {"escalate", "bind", "impersonate"} & verbs


def test_ztunnel_rbac_is_read_only_pods_and_namespaces() -> None:
    assert _grants(_one("ClusterRole", "ztunnel")) == {
        ("", "pods"): {"get", "list", "watch"},
        ("", "namespaces"): {"get", "list", "watch"},
    }
    binding = _one("ClusterRoleBinding", "ztunnel")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ztunnel", "namespace": NAMESPACE}
    ]
    assert POD["serviceAccountName"] == "ztunnel"


def test_control_plane_rbac_covers_what_it_watches() -> None:
    from waypoint.controlplane.service import WATCHED

    manager_sa = _one("Deployment", "waypoint-manager")["spec"]["template"]["spec"]
    account = manager_sa["serviceAccountName"]
    granted: dict[tuple[str, str], set[str]] = {}
    for binding in (o for o in ALL if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding[
            "subjects"
        ] and binding["roleRef"]["kind"] == "ClusterRole":
            for key, verbs in _grants(_one("ClusterRole", binding["roleRef"]["name"])).items():
                granted.setdefault(key, set()).update(verbs)
    for rt in WATCHED:  # every informer of the control-plane service can list and watch
        assert {"list", "watch"} <= granted.get((rt.group, rt.plural), set()), rt.kind
    for key in (("discovery.k8s.io", "endpointslices"), ("", "serviceaccounts")):
        assert {"list", "watch"} <= granted[key], key
    assert granted[("authentication.k8s.io", "tokenreviews")] == {"create"}


def test_control_plane_additions_are_read_only_except_tokenreview() -> None:
    grants = _grants(_one("ClusterRole", "waypoint-manager-controlplane"))
    for key, verbs in grants.items():
        if key == ("authentication.k8s.io", "tokenreviews"):
            assert verbs == {"create"}
        else:
            assert verbs <= {"get", "list", "watch"}, key
    assert {g for g, _ in grants} == {
        "",
        "authentication.k8s.io",
        "discovery.k8s.io",
        "security.istio.io",
    }


def test_leader_election_is_namespaced_to_leases() -> None:
    role = _one("Role", "waypoint-manager-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _grants(role) == {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
    assert not [
        o
        for o in ALL
        if o["kind"] == "ClusterRole"
        and any(g == "coordination.k8s.io" for r in o["rules"] for g in r["apiGroups"])
    ], "leases are granted in ambient-system only"


# --- the control-plane Service -----------------------------------------------------------------


@pytest.mark.parametrize("var", ["XDS_ADDRESS", "CA_ADDRESS"])
def test_ztunnel_dials_the_control_plane_service(var: str) -> None:
    url = urlsplit(ENV[var]["value"])
    assert url.scheme == "https"
    name, namespace, svc = (url.hostname or "").split(".")
    assert svc == "svc"
    assert url.port == XDS_PORT
    service = _one("Service", name)
    assert service["metadata"]["namespace"] == namespace
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == XDS_PORT]
    assert port["targetPort"] == XDS_PORT
    assert port["appProtocol"] == "grpc"
    manager = _one("Deployment", "waypoint-manager")
    assert manager["metadata"]["namespace"] == namespace
    pod_labels = manager["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not _selects_ztunnel(service)


def _selects_ztunnel(service: Object) -> bool:
    labels: dict[str, str] = DAEMONSET["spec"]["template"]["metadata"]["labels"]
    selector: dict[str, str] = service["spec"]["selector"]
    return selector.items() <= labels.items()


# --- the DaemonSet -----------------------------------------------------------------------------


def test_capabilities_are_exactly_the_three_it_needs() -> None:
    sc = CONTAINER["securityContext"]
    assert set(sc["capabilities"]["add"]) == ZTUNNEL_CAPS
    assert len(sc["capabilities"]["add"]) == len(ZTUNNEL_CAPS)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert (sc["runAsUser"], sc["runAsGroup"]) == (0, 1337)  # uid 0, gid 1337 as Istio's chart
    assert "securityContext" not in POD or "capabilities" not in POD["securityContext"]
    assert POD["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert POD.get("initContainers") is None, "no other container gets privileges"


def test_host_access_is_read_only_and_minimal() -> None:
    assert POD["hostPID"] is False
    assert POD["hostNetwork"] is False
    assert not POD.get("hostIPC")
    host = {v["name"]: v["hostPath"] for v in POD["volumes"] if "hostPath" in v}
    assert {h["path"] for h in host.values()} == {"/var/run/netns", "/proc"}
    mounts = {m["name"]: m for m in CONTAINER["volumeMounts"]}
    for name, hp in host.items():
        assert mounts[name]["readOnly"] is True, hp["path"]
        assert mounts[name].get("mountPropagation", "None") in ("None", "HostToContainer")
    by_path = {hp["path"]: mounts[name] for name, hp in host.items()}
    assert by_path["/var/run/netns"]["mountPath"] == "/var/run/netns"
    assert by_path["/var/run/netns"]["mountPropagation"] == "HostToContainer"  # new pods show up
    assert by_path["/proc"]["mountPath"] == "/host/proc"  # never over the container's own /proc
    assert ENV["HOST_PROC"]["value"] == "/host/proc"
    assert not [p for p in CONTAINER.get("ports", []) if "hostPort" in p]


def test_writable_paths_are_only_scratch() -> None:
    writable = [m for m in CONTAINER["volumeMounts"] if not m.get("readOnly")]
    volumes = {v["name"]: v for v in POD["volumes"]}
    assert [m["mountPath"] for m in writable] == ["/tmp"]
    assert "emptyDir" in volumes[writable[0]["name"]]
    assert ENV["XTABLES_LOCKFILE"]["value"].startswith("/tmp/")


def test_istio_ca_token_is_projected_with_audience_istio_ca() -> None:
    mounts = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
    directory, _, filename = TOKEN_PATH.rpartition("/")
    mount = mounts[directory]
    (volume,) = [v for v in POD["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["path"] == filename
    assert token["audience"] == "istio-ca"
    assert 600 <= token["expirationSeconds"] <= 24 * 3600


@pytest.mark.parametrize(
    ("var", "field"),
    [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("NODE_NAME", "spec.nodeName"),
        ("INSTANCE_IP", "status.podIP"),
        ("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ],
)
def test_downward_api_env(var: str, field: str) -> None:
    assert ENV[var]["valueFrom"] == {"fieldRef": {"fieldPath": field}}


def test_root_cert_for_the_control_plane_is_mounted() -> None:
    mounts = {m["mountPath"]: m for m in CONTAINER["volumeMounts"]}
    for var in ("XDS_ROOT_CA", "CA_ROOT_CA"):
        directory, _, key = ENV[var]["value"].rpartition("/")
        (volume,) = [v for v in POD["volumes"] if v["name"] == mounts[directory]["name"]]
        assert volume["configMap"]["name"] == "istio-ca-root-cert"
        assert key == "root-cert.pem"


def test_readiness_probe_is_ztunnels_readiness_endpoint() -> None:
    probe = CONTAINER["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz/ready", "port": zconfig.READINESS_PORT}
    ports = {p["containerPort"] for p in CONTAINER["ports"]}
    assert {zconfig.READINESS_PORT, zconfig.METRICS_PORT} <= ports
    annotations = DAEMONSET["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(zconfig.METRICS_PORT)


def test_rolling_update_is_surge_first_for_hitless_restart() -> None:
    strategy = DAEMONSET["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_drain_deadline_fits_the_grace_period() -> None:
    grace = POD["terminationGracePeriodSeconds"]
    assert ENV["TERMINATION_GRACE_PERIOD_SECONDS"]["value"] == str(grace)
    # Istio's formula for the connection-termination deadline, from the grace period.
    deadline = max(1, grace - 5 if grace > 10 else grace - 1)
    assert f"--drain-deadline={deadline}" in CONTAINER["args"]
    assert DEFAULT_DEADLINE <= deadline < grace, "drain must end before the kubelet's SIGKILL"
    assert grace - deadline >= 5, "time left after the deadline to close connections cleanly"
    assert "preStop" not in CONTAINER.get("lifecycle", {}), "nothing may eat into the drain"


def test_runs_on_every_node_at_node_critical_priority() -> None:
    assert POD["priorityClassName"] == "system-node-critical"
    assert POD["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
    assert POD["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert not POD.get("affinity")
    labels = DAEMONSET["spec"]["template"]["metadata"]["labels"]
    assert labels["istio.io/dataplane-mode"] == "none"  # ztunnel never captures itself


def test_resources_request_memory_and_cpu_and_cap_memory() -> None:
    resources = CONTAINER["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert "cpu" not in resources["limits"], "a throttled node proxy stalls every pod on the node"


# --- image and entry points --------------------------------------------------------------------


def _containers() -> Iterator[tuple[str, Object]]:
    for obj in ALL:
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            yield obj["metadata"]["name"], c


def test_container_commands_are_console_scripts_of_this_package() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {(c["command"][0], c["args"][0]) for _, c in _containers()}
    assert commands == {("ztunnel", "run"), ("waypoint", "manager")}
    assert all(cmd in scripts for cmd, _ in commands)


def test_dockerfile_builds_the_package_on_python_311_slim_and_drops_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms
    assert all(f.startswith("python:3.11-slim") for f in froms)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("0", "root")
    # The package is built from this checkout (a wheel of `.`) and installed with its dependencies.
    assert re.search(r"pip wheel .*\s\.$", text, re.MULTILINE)
    assert re.search(r"pip install .*\.whl", text)
    assert "gen-protos" in text, "generated gRPC code is built into the image, never committed"
    # Every non-root container runs as the image's user; only ztunnel is root, by its own choice.
    uid = users[-1].split(":")[0]
    manager = _one("Deployment", "waypoint-manager")["spec"]["template"]["spec"]
    assert str(manager["securityContext"]["runAsUser"]) == uid


def test_ztunnel_flags_are_known_to_ztunnel_run(capsys: pytest.CaptureFixture[str]) -> None:
    from ztunnel.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    usage = capsys.readouterr().out
    flags = [a.split("=")[0] for a in CONTAINER["args"] if a.startswith("--")]
    assert flags
    for flag in flags:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", usage), f"`ztunnel run` has no {flag}"
    # Kubernetes expands $(VAR) only for variables the container defines.
    for ref in re.findall(r"\$\((\w+)\)", " ".join(CONTAINER["args"])):
        assert ref in ENV, ref


# --- the manager's waypoint pods ---------------------------------------------------------------

MANAGER = _one("Deployment", "waypoint-manager")
(MANAGER_CONTAINER,) = MANAGER["spec"]["template"]["spec"]["containers"]


def _manager_flags() -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in MANAGER_CONTAINER["args"] if "=" in a)


def test_manager_flags_are_known_to_waypoint_manager(capsys: pytest.CaptureFixture[str]) -> None:
    from waypoint.cli import main

    with pytest.raises(SystemExit):
        main(["manager", "--help"])
    usage = capsys.readouterr().out
    flags = [a.split("=")[0] for a in MANAGER_CONTAINER["args"] if a.startswith("--")]
    for flag in flags:
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", usage), (
            f"`waypoint manager` has no {flag}"
        )


def test_waypoint_pods_dial_what_ztunnel_dials() -> None:
    """The rendered waypoints' XDS_ADDRESS/CA_ADDRESS/CLUSTER_ID equal the DaemonSet's."""
    flags = _manager_flags()
    assert flags["proxy-xds-address"] == ENV["XDS_ADDRESS"]["value"]
    assert flags["proxy-ca-address"] == ENV["CA_ADDRESS"]["value"]
    assert flags["proxy-cluster-id"] == ENV["CLUSTER_ID"]["value"] == flags["cluster-id"]
    from waypoint import cli

    config = cli.render_config(
        cli.parse_manager_args(
            ["manager", *(a for a in MANAGER_CONTAINER["args"][1:] if "$(" not in a)]
        )
    )
    assert (config.xds_address, config.ca_address, config.cluster_id) == (
        ENV["XDS_ADDRESS"]["value"],
        ENV["CA_ADDRESS"]["value"],
        ENV["CLUSTER_ID"]["value"],
    )


def test_manager_issues_its_serving_certificate_for_the_names_clients_verify() -> None:
    """TLS by default from the mounted CA: no serving-certificate Secret, no plaintext."""
    from waypoint import cli
    from waypoint.controlplane.cli import serving_names

    args = cli.parse_manager_args(
        ["manager", *(a for a in MANAGER_CONTAINER["args"][1:] if "$(" not in a)]
    )
    assert not args.plaintext
    assert args.tls_cert_chain is None
    assert args.tls_key is None
    mounts = {m["mountPath"]: m for m in MANAGER_CONTAINER["volumeMounts"]}
    assert str(args.ca_dir) in mounts
    assert mounts[str(args.ca_dir)]["readOnly"]
    secrets = [
        v["secret"]["secretName"]
        for v in MANAGER["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    ]
    assert secrets == ["cacerts"]  # the CA only; the serving certificate is issued from it
    dns, ips = serving_names(args)
    assert ips == []
    for var in ("XDS_ADDRESS", "CA_ADDRESS"):
        host = urlsplit(ENV[var]["value"]).hostname
        assert host in dns, f"{var} host {host} is not a SAN of the serving certificate"
        assert ENV[var.replace("ADDRESS", "ROOT_CA")]["value"].startswith("/var/run/secrets/istio/")


def _manager_grants() -> dict[tuple[str, str], set[str]]:
    account = MANAGER["spec"]["template"]["spec"]["serviceAccountName"]
    granted: dict[tuple[str, str], set[str]] = {}
    for binding in (o for o in ALL if o["kind"] == "ClusterRoleBinding"):
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding[
            "subjects"
        ]:
            for key, verbs in _grants(_one("ClusterRole", binding["roleRef"]["name"])).items():
                granted.setdefault(key, set()).update(verbs)
    return granted


def test_manager_can_bind_the_waypoint_proxy_role_without_the_bind_verb() -> None:
    """RBAC escalation check: a RoleBinding to a role is allowed when the creator holds its rights."""
    from waypoint.manager.render import DEFAULT_PROXY_CLUSTER_ROLE

    role = _one("ClusterRole", DEFAULT_PROXY_CLUSTER_ROLE)
    granted = _manager_grants()
    for key, verbs in _grants(role).items():
        assert verbs <= granted.get(key, set()), f"the manager lacks {key} {verbs}"
        assert verbs <= {"get", "list", "watch"}, "the waypoint proxy only reads"
    assert {"create", "patch", "delete"} <= granted[("rbac.authorization.k8s.io", "rolebindings")]


def test_manager_publishes_the_root_cert_the_pods_mount() -> None:
    from waypoint.manager.render import RenderConfig
    from waypoint.manager.rootcert import ROOT_CERT_CONFIGMAP

    assert RenderConfig().root_cert_configmap == ROOT_CERT_CONFIGMAP
    volumes = [v["configMap"]["name"] for v in POD["volumes"] if "configMap" in v]
    assert volumes == [ROOT_CERT_CONFIGMAP]  # ztunnel's, in ambient-system
    assert _manager_grants()[("", "configmaps")] == {"get", "list", "watch", "create", "patch"}
