"""The DaemonSet install renders, validates against Kubernetes schemas and matches the agent."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cacheagent.config import load_config
from cacheagent.fuse.stats import FuseStats
from cacheagent.metrics import GpuFigures, Metrics, ModelFigures, Snapshot, StoreFigures
from cacheagent.peers.stats import PeerCollector, PeerStats
from tests import pod_spec
from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "daemonset"
K8S_VERSION = "1.32"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    kubectl = require_binary("kubectl")
    out = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_every_object_validates_against_the_kubernetes_schemas(
    rendered: list[dict[str, Any]],
) -> None:
    examples = [
        doc
        for path in sorted((DEPLOY / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]
    for doc in [*rendered, *examples]:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in rendered}
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "CSIDriver",
        "DaemonSet",
        "Service",
    } <= kinds


def test_csidriver_is_node_only_with_pod_info(rendered: list[dict[str, Any]]) -> None:
    (driver,) = _by_kind(rendered, "CSIDriver")
    spec = driver["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert set(spec["volumeLifecycleModes"]) == {"Persistent", "Ephemeral"}


def test_daemonset_mounts_and_probes(rendered: list[dict[str, Any]]) -> None:
    ds = pod_spec.find(rendered, "DaemonSet", "cacheagent")
    pod = ds["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    assert agent["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert "/dev/fuse" in mounts
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert any(c["name"] == "node-driver-registrar" for c in pod["containers"])


def test_configmap_is_a_valid_agent_config(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    cm = next(
        d for d in _by_kind(rendered, "ConfigMap") if d["metadata"]["name"].endswith("config")
    )
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    config = load_config(path, {}, {})
    (driver,) = _by_kind(rendered, "CSIDriver")
    assert config.csi.driver_name == driver["metadata"]["name"]


def test_dashboard_queries_only_metrics_the_agent_exports() -> None:
    dashboard = json.loads((DEPLOY / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {m for e in exprs for m in re.findall(r"\bcacheagent_[a-z_]+", e)}
    exported = _exported_metric_names()
    missing = sorted(queried - exported)
    assert not missing, f"dashboard queries metrics the agent does not export: {missing}"
    assert len(queried) >= 15


def _exported_metric_names() -> set[str]:
    """Names a busy agent exports: a store, a model, a GPU, and every labelled family."""
    metrics = Metrics()
    metrics.snapshot = Snapshot(
        store=StoreFigures(capacity_bytes=10, used_bytes=5, models=1, blobs=2),
        models=[ModelFigures("sha256:" + "a" * 64, "demo", 100, 50)],
        nvml_up=True,
        gpus=[GpuFigures(0, "GPU-0", "H100", 80, 40, 0.5, 40.0, 300.0)],
    )
    metrics.fuse_counts = FuseStats().snapshot
    metrics.registry.register(PeerCollector(PeerStats(), lambda: 0))  # what peers.enabled adds
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        # Labelled families with no child yet still export these names once used.
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def _render_with(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    overlay = pod_spec.write_overlay(
        tmp_path / "overlay", DEPLOY, [DEPLOY / "components" / c for c in components]
    )
    docs = pod_spec.render(require_binary("kubectl"), overlay)
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return docs


def test_nvml_comes_from_the_nvidia_runtime_not_host_library_dirs(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    pod = pod_spec.pod_spec(rendered)
    agent = pod_spec.container(pod, "agent")
    env = pod_spec.environment(agent, {"spec.nodeName": "n"})
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    assert "LD_LIBRARY_PATH" not in env
    host_dirs = [v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v]
    assert not [
        p for p in host_dirs if "/lib" in p and "kubelet" not in p and "cacheagent" not in p
    ]
    assert "runtimeClassName" not in pod
    with_class = pod_spec.pod_spec(_render_with(tmp_path, "nvidia-runtime-class"))
    assert with_class["runtimeClassName"] == "nvidia"


def test_schedules_on_every_node_and_the_quota_admits_its_priority(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    ds = pod_spec.find(rendered, "DaemonSet", "cacheagent")
    pod = pod_spec.pod_spec(rendered)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert "nodeSelector" not in pod
    priority = pod["priorityClassName"]
    quotas = [
        q
        for q in _by_kind(rendered, "ResourceQuota")
        if q["metadata"]["namespace"] == ds["metadata"]["namespace"]
    ]
    covering = [
        q
        for q in quotas
        for e in q["spec"]["scopeSelector"]["matchExpressions"]
        if e["scopeName"] == "PriorityClass" and e["operator"] == "In" and priority in e["values"]
    ]
    assert covering and int(covering[0]["spec"]["hard"]["pods"]) >= 1000
    gpu_only = pod_spec.pod_spec(_render_with(tmp_path, "gpu-nodes"))
    assert gpu_only["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_only["tolerations"] == [{"operator": "Exists"}]


def test_the_agent_has_no_memory_limit_to_evict_warmed_models(
    rendered: list[dict[str, Any]],
) -> None:
    agent = pod_spec.container(pod_spec.pod_spec(rendered), "agent")
    assert "memory" not in agent["resources"].get("limits", {})
    assert "memory" in agent["resources"]["requests"]
