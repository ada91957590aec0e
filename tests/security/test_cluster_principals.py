"""The cluster boundary: each department is its own principal, namespaces deny by default, Ray answers only
with its token, and every pod runs under the `restricted` Pod Security profile.

Everything here is asserted on the rendered objects (`biomedgpt cluster render`, the kustomize builds of
k8s/, the RayJobs of `biomedgpt k8s rayjob`). That a CNI enforces the NetworkPolicies, and that the API server
admits the pods under `restricted`, needs a running cluster: the NetworkPolicies are evaluated here by the
rules of the NetworkPolicy API (`reachable`), and the pod specs are checked against the rules of the
restricted profile (`restricted_problems`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Iterator

import pytest

from biomedgpt.cluster.render import (API_KEYS_DIR, CLIENT_PORT, DASHBOARD_PORT, GCS_PORT, RAY_TOKEN_SECRET,
                                      SERVE_PORT)
from biomedgpt.tenancy import TenancyError, load_tenants

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
RAY_PORTS = {"GCS": GCS_PORT, "dashboard/job API": DASHBOARD_PORT, "Ray client": CLIENT_PORT}


def every(builds) -> list[dict[str, Any]]:
    out = {}
    for objs in builds.values():
        for o in objs:
            m = o["metadata"]
            out[(o["kind"], m.get("namespace", ""), m["name"])] = o
    return list(out.values())


def ray_objects(builds, rayjobs) -> list[dict[str, Any]]:
    # the overlays' objects (k8s/base/ alone is a template, applied only through an overlay)
    objs = [o for o in every(builds) if o["kind"] in ("RayCluster", "RayService") and o["metadata"].get("namespace")]
    objs += [o for o in rayjobs if o["kind"] == "RayJob"]
    assert {o["kind"] for o in objs} == {"RayCluster", "RayService", "RayJob"}
    return objs


def cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    return {"RayCluster": spec, "RayService": spec.get("rayClusterConfig"), "RayJob": spec.get("rayClusterSpec")}[
        obj["kind"]]


def templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a Ray object makes: head, worker groups, a RayJob's submitter."""
    who = f"{obj['kind']} {obj['metadata']['namespace']}/{obj['metadata']['name']}"
    cluster = cluster_spec(obj)
    yield f"{who} head", cluster["headGroupSpec"]["template"]
    for g in cluster["workerGroupSpecs"]:
        yield f"{who} {g['groupName']}", g["template"]
    if obj["kind"] == "RayJob":
        yield f"{who} submitter", obj["spec"]["submitterPodTemplate"]


def team_of(tenants, obj):
    return tenants.team(obj["metadata"]["labels"]["biomedgpt.io/team"])


# ----------------------------------------------------------------------------------------------
# Each department is its own principal
# ----------------------------------------------------------------------------------------------


def test_every_department_has_its_own_service_account_and_cloud_identity(tenants, builds):
    objs = every(builds)
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs if o["kind"] == "ServiceAccount"}
    departments = [t for t in tenants.teams.values() if not t.local_only]
    assert len({(t.namespace, t.service_account) for t in departments}) == len(departments) >= 5
    for team in departments:
        sa = accounts.pop((team.namespace, team.service_account))
        assert sa["metadata"]["labels"]["biomedgpt.io/team"] == team.name
        assert sa["metadata"].get("annotations", {}) == dict(team.service_account_annotations)
        assert sa["automountServiceAccountToken"] is False  # a pod gets an API token only if it asks
    assert accounts == {}, "no ServiceAccount shared by the departments of an institution"
    roles = [t.service_account_annotations["eks.amazonaws.com/role-arn"] for t in departments
             if t.service_account_annotations]
    assert len(roles) >= 2 and len(set(roles)) == len(roles)
    radiology = tenants.team("stanford-like-radiology").service_account_annotations
    assert radiology["eks.amazonaws.com/role-arn"].endswith("role/biomedgpt-stanford-like-radiology")


def test_two_departments_may_not_share_a_cloud_identity(tenants_file):
    def shared(d):
        same = {"eks.amazonaws.com/role-arn": "arn:aws:iam::111111111111:role/one-role"}
        for dept in d["institutions"]["stanford-like"]["departments"].values():
            dept["serviceAccountAnnotations"] = dict(same)

    with pytest.raises(TenancyError, match=r"departments\.pathology\.serviceAccountAnnotations\.eks\.amazonaws\.com/"
                                           r"role-arn: .*is also the identity of .*radiology: each department is "
                                           r"its own principal"):
        load_tenants(tenants_file(shared))

    def institution_wide(d):  # the old per-institution identity is refused, naming the field
        d["institutions"]["mayo-like"]["serviceAccountAnnotations"] = {"x": "y"}

    with pytest.raises(TenancyError, match=r"institutions\.mayo-like: unknown key .*serviceAccountAnnotations"):
        load_tenants(tenants_file(institution_wide))


def test_a_departments_ray_pods_run_as_its_own_service_account(tenants, builds, rayjobs):
    for obj in ray_objects(builds, rayjobs):
        team = team_of(tenants, obj)
        assert obj["metadata"]["namespace"] == team.namespace
        for where, template in templates(obj):
            pod = template["spec"]
            assert pod["serviceAccountName"] == team.service_account, where
            assert template["metadata"]["labels"]["biomedgpt.io/team"] == team.name, where
            for c in pod["containers"]:
                refs = {(k, v["name"]) for ref in c.get("envFrom", []) for k, v in ref.items()}
                # storage settings of the department, not of the institution
                assert refs <= {("configMapRef", f"{team.department}-biomedgpt-storage"),
                                ("secretRef", f"{team.department}-biomedgpt-storage")}, where


def test_the_autoscaler_role_is_bound_to_each_department_account(tenants, builds):
    bindings = [o for o in every(builds) if o["kind"] == "RoleBinding" and o["roleRef"]["name"] ==
                "biomedgpt-ray-autoscaler"]
    subjects = {(b["metadata"]["namespace"], s["name"]) for b in bindings for s in b["subjects"]}
    assert subjects == {(t.namespace, t.service_account) for t in tenants.teams.values() if not t.local_only}
    assert all(s["kind"] == "ServiceAccount" for b in bindings for s in b["subjects"])


def test_pods_get_an_api_token_only_where_the_autoscaler_needs_it(builds, rayjobs):
    for obj in ray_objects(builds, rayjobs):
        autoscaling = bool(cluster_spec(obj).get("enableInTreeAutoscaling"))
        for where, template in templates(obj):
            head = where.endswith(" head")
            assert template["spec"]["automountServiceAccountToken"] is (head and autoscaling), where


# ----------------------------------------------------------------------------------------------
# NetworkPolicies: deny by default; evaluated by the NetworkPolicy API's rules
# ----------------------------------------------------------------------------------------------


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values or op == "NotIn" and labels.get(key) in values or \
                op == "Exists" and key not in labels or op == "DoesNotExist" and key in labels:
            return False
    return True


def peer_matches(peer: dict[str, Any], policy_ns: str, other: dict[str, Any]) -> bool:
    """Whether a NetworkPolicy peer (from/to entry) covers `other`: {"ns", "labels", "ip"}."""
    if "ipBlock" in peer:
        ip = ipaddress.ip_address(other["ip"])
        block = peer["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and \
            not any(ip in ipaddress.ip_network(x) for x in block.get("except", []))
    if other.get("ns") is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": other["ns"]}):
            return False
        return selects(peer.get("podSelector", {}), other["labels"])
    return other["ns"] == policy_ns and selects(peer["podSelector"], other["labels"])


def reachable(policies, src: dict[str, Any], dst: dict[str, Any], port: int, protocol: str = "TCP") -> bool:
    """Whether a connection src -> dst:port is allowed: egress of src's namespace and ingress of dst's, as the
    NetworkPolicy API defines them (a pod selected by no policy of a direction is not isolated in it)."""

    def allowed(direction: str, pod: dict[str, Any], other: dict[str, Any]) -> bool:
        if pod.get("ns") is None:  # outside the cluster: no policy of ours applies
            return True
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        mine = [p for p in policies if p["metadata"]["namespace"] == pod["ns"] and
                direction in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], pod["labels"])]
        if not mine:
            return True
        for p in mine:
            for rule in p["spec"].get(key) or []:
                peers = rule.get(peers_key)
                ports = rule.get("ports")
                if ports and not any(x.get("protocol", "TCP") == protocol and x["port"] == port for x in ports):
                    continue
                if not peers or any(peer_matches(peer, pod["ns"], other) for peer in peers):
                    return True
        return False

    return allowed("Egress", src, dst) and allowed("Ingress", dst, src)


_ips = iter(f"10.244.{i // 250}.{i % 250 + 2}" for i in range(10**5))


def pod(ns: str | None, labels: dict[str, str] | None = None, ip: str | None = None) -> dict[str, Any]:
    return {"ns": ns, "labels": dict(labels or {}), "ip": ip or next(_ips)}


@pytest.fixture(scope="module")
def network(tenants, builds, rayjobs):
    """The NetworkPolicies, and the pods of every department: (team, where, pod)."""
    policies = [o for o in every(builds) if o["kind"] == "NetworkPolicy"]
    pods = []
    for obj in ray_objects(builds, rayjobs):
        team = team_of(tenants, obj)
        for where, template in templates(obj):
            labels = dict(template["metadata"].get("labels", {}), **{"ray.io/cluster": obj["metadata"]["name"]})
            pods.append((team, where, pod(team.namespace, labels)))
    return policies, pods


def test_every_tenant_namespace_denies_in_and_out_by_default(tenants, builds):
    policies = [o for o in every(builds) if o["kind"] == "NetworkPolicy"]
    for inst in tenants.institutions.values():
        deny = [p for p in policies if p["metadata"]["namespace"] == inst.namespace and p["spec"]["podSelector"] == {}
                and sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"] and not p["spec"].get("ingress")
                and not p["spec"].get("egress")]
        assert len(deny) == 1, inst.namespace


def test_rays_control_ports_are_unreachable_from_every_other_namespace(tenants, network):
    policies, pods = network
    net = tenants.network
    heads = [(t, w, p) for t, w, p in pods if p["labels"].get("biomedgpt.io/ray-node") == "head"]
    assert len(heads) >= 7
    strangers = [pod(other.namespace, p["labels"]) for other in tenants.institutions.values()
                 for _, _, p in pods[:1]] + [
        pod(net.ingress_namespace, {"app.kubernetes.io/name": "ingress-nginx"}),
        pod(net.operator_namespace, {"app.kubernetes.io/name": "not-the-operator"}),
        pod(net.dns_namespace, dict(net.dns_pod_labels)), pod("default"), pod(None, ip="203.0.113.7")]
    operator = pod(net.operator_namespace, dict(net.operator_pod_labels))
    for team, where, head in heads:
        for src in strangers:
            if src["ns"] == team.namespace:
                continue
            for name, port in RAY_PORTS.items():
                assert not reachable(policies, src, head, port), f"{name} of {where} from {src['ns']}"
        # the KubeRay operator reaches the dashboard/job API (it deploys Serve configs, submits and follows
        # jobs, with the Ray token), never the GCS or the Ray client port
        assert reachable(policies, operator, head, DASHBOARD_PORT), where
        assert not reachable(policies, operator, head, GCS_PORT) and not reachable(policies, operator, head, CLIENT_PORT)


def test_only_a_rayservices_serve_port_is_reachable_from_the_ingress_namespace(tenants, network):
    policies, pods = network
    ingress = pod(tenants.network.ingress_namespace, {"app.kubernetes.io/name": "ingress-nginx"})
    serving = 0
    for team, where, p in pods:
        is_service = where.startswith("RayService")
        assert reachable(policies, ingress, p, SERVE_PORT) is is_service, where
        serving += is_service
        for port in RAY_PORTS.values():
            assert not reachable(policies, ingress, p, port), where
    assert serving >= 4  # head and gpu-serve of two departments


def test_pods_reach_their_own_namespace_dns_and_object_storage_only(tenants, network):
    policies, pods = network
    net = tenants.network
    dns = pod(net.dns_namespace, dict(net.dns_pod_labels))
    storage, plain_http, api_server = (pod(None, ip="52.216.8.1"), pod(None, ip="52.216.8.1"), pod(None, ip="10.0.0.1"))
    for team, where, src in pods:
        for other_team, other_where, dst in pods:
            if dst is src:
                continue
            same = other_team.namespace == team.namespace
            assert reachable(policies, src, dst, GCS_PORT) is same, (where, other_where)
        assert reachable(policies, src, dns, 53, "UDP") and reachable(policies, src, dns, 53, "TCP"), where
        assert not reachable(policies, src, pod(net.dns_namespace, {"k8s-app": "metrics"}), 53, "UDP"), where
        assert reachable(policies, src, storage, 443), where
        assert not reachable(policies, src, plain_http, 80), where
        # the API server: heads only (their autoscaler), nothing else in the cluster's private ranges
        assert reachable(policies, src, api_server, 443) is where.endswith(" head"), where
        assert not reachable(policies, src, pod(None, ip="10.12.0.9"), 443), where


# ----------------------------------------------------------------------------------------------
# Ray token auth
# ----------------------------------------------------------------------------------------------


def test_every_ray_head_uses_token_auth_from_its_namespaces_secret(builds, rayjobs):
    for obj in ray_objects(builds, rayjobs):
        cluster = cluster_spec(obj)
        assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}, obj["metadata"]["name"]
        for where, template in templates(obj):
            for c in template["spec"]["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": RAY_TOKEN_SECRET, "key": "auth_token"}, where  # never a literal token
                assert "value" not in env["RAY_AUTH_TOKEN"]


# ----------------------------------------------------------------------------------------------
# Pod security
# ----------------------------------------------------------------------------------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_problems(pod: dict[str, Any]) -> list[str]:
    """What the `restricted` Pod Security level (Kubernetes Pod Security Standards) refuses in a pod spec."""
    out = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(flag)
    for v in pod.get("volumes") or []:
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(set(v) - {'name'})}")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        out.append("securityContext.seccompProfile")
    if psc.get("runAsUser") == 0:
        out.append("securityContext.runAsUser 0")
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add")
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            out.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


def test_every_pod_template_meets_the_restricted_profile_with_a_read_only_root(builds, rayjobs):
    n = 0
    for obj in ray_objects(builds, rayjobs):
        for where, template in templates(obj):
            pod = template["spec"]
            n += 1
            assert restricted_problems(pod) == [], where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            volumes = {v["name"]: v for v in pod["volumes"]}
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert (sc["allowPrivilegeEscalation"], sc["capabilities"], sc["readOnlyRootFilesystem"]) == \
                    (False, {"drop": ["ALL"]}, True), where
                mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
                # where Ray and the platform write: emptyDirs, everything else read-only
                writable = {"/tmp"} if where.endswith("submitter") else \
                    {"/tmp", "/home/ray/.cache", "/home/ray/biomedgpt-runs"}
                for path in writable:
                    assert "emptyDir" in volumes[mounts[path]["name"]], (where, path)
                for path, m in mounts.items():
                    if "emptyDir" not in volumes[m["name"]]:
                        assert m.get("readOnly") is True, (where, path)
                limits = c["resources"]["limits"]
                assert "ephemeral-storage" in limits and "ephemeral-storage" in c["resources"]["requests"], where
        autoscaler = cluster_spec(obj).get("autoscalerOptions")
        if autoscaler:  # the sidecar KubeRay adds to an autoscaling head
            sc = autoscaler["securityContext"]
            assert (sc["allowPrivilegeEscalation"], sc["capabilities"], sc["readOnlyRootFilesystem"],
                    sc["runAsNonRoot"]) == (False, {"drop": ["ALL"]}, True, True)
    assert n >= 15


def test_the_restricted_check_refuses_what_the_profile_refuses():
    good = {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False,
                                                             "capabilities": {"drop": ["ALL"]}}}]}
    assert restricted_problems(good) == []
    bad = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "c", "ports": [{"containerPort": 1, "hostPort": 1}],
                           "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}]}
    problems = restricted_problems(bad)
    for word in ("hostNetwork", "volume h", "seccompProfile", "privileged", "allowPrivilegeEscalation",
                 "drop ALL", "capabilities.add", "runAsNonRoot", "hostPort"):
        assert any(word in p for p in problems), word


def test_namespaces_enforce_restricted_and_quota_ephemeral_storage(tenants, builds):
    objs = every(builds)
    for inst in tenants.institutions.values():
        ns = next(o for o in objs if o["kind"] == "Namespace" and o["metadata"]["name"] == inst.namespace)
        labels = ns["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", (inst.name, mode)
        quota = next(o for o in objs if o["kind"] == "ResourceQuota" and o["metadata"]["namespace"] == inst.namespace)
        hard = quota["spec"]["hard"]
        assert hard["requests.ephemeral-storage"] == hard["limits.ephemeral-storage"] == inst.ephemeral_storage
        limits = next(o for o in objs if o["kind"] == "LimitRange" and o["metadata"]["namespace"] == inst.namespace)
        (container,) = limits["spec"]["limits"]
        # containers that ask nothing (KubeRay's own) still get an ephemeral-storage request and limit
        assert "ephemeral-storage" in container["default"] and "ephemeral-storage" in container["defaultRequest"]
    assert tenants.institutions["stanford-like"].ephemeral_storage == "8Ti"


def test_the_rayservice_mounts_its_departments_key_secret_read_only(tenants, builds):
    secrets = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in every(builds) if o["kind"] == "Secret"}
    services = [o for o in every(builds) if o["kind"] == "RayService" and o["metadata"].get("namespace")]
    assert len(services) >= 2
    for obj in services:
        team = team_of(tenants, obj)
        assert (team.namespace, team.api_keys_secret) in secrets
        for where, template in templates(obj):
            volumes = {v["name"]: v for v in template["spec"]["volumes"] if "secret" in v}
            (keys,) = volumes.values()
            assert keys["secret"]["secretName"] == team.api_keys_secret, where
            for c in template["spec"]["containers"]:
                (mount,) = [m for m in c["volumeMounts"] if m["name"] == keys["name"]]
                # the whole folder, not a subPath: the kubelet then updates the file when the Secret changes
                assert mount["mountPath"] == API_KEYS_DIR and mount["readOnly"] is True and "subPath" not in mount


def test_the_secured_manifests_still_validate_strictly(builds, rayjobs, validator):
    problems = []
    for d, objs in builds.items():
        problems += validator.validate(objs, f"kubectl kustomize {d}")
    problems += validator.validate(rayjobs, "biomedgpt k8s rayjob cluster/jobs/*.yaml")
    assert problems == []
    kinds = {o["kind"] for objs in builds.values() for o in objs}
    assert {"NetworkPolicy", "Secret", "ServiceAccount", "RayCluster", "RayService"} <= kinds
