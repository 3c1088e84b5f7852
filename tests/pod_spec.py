"""Read a rendered DaemonSet the way kubelet would run it, so that tests can run it here.

No cluster runs on the test machines; these helpers resolve what kubelet resolves (the
container's environment and ``$(VAR)`` references, volume mounts with ``subPath``, hostPath
volumes, ConfigMap/Secret/projected files, named probe ports) and lay the agent container's
volumes out under a temporary root, one directory per mount path.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cacheagent.config import Config

Doc = dict[str, Any]


def render(kubectl: str, directory: Path) -> list[Doc]:
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def write_overlay(
    directory: Path, base: Path, components: Sequence[Path], resources: Sequence[Doc] = ()
) -> Path:
    """A kustomization over ``base`` with ``components`` (kustomize wants relative paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    extra = []
    for index, doc in enumerate(resources):
        name = f"resource-{index}.yaml"
        (directory / name).write_text(yaml.safe_dump(doc))
        extra.append(name)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base, directory), *extra],
        "components": [os.path.relpath(c, directory) for c in components],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def find(docs: Sequence[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(docs: Sequence[Doc], name: str = "cacheagent") -> Doc:
    """The pod template of DaemonSet ``name`` (the agent's unless told)."""
    spec: Doc = find(docs, "DaemonSet", name)["spec"]["template"]["spec"]
    return spec


def container(pod: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def environment(c: Doc, field_values: Mapping[str, str]) -> dict[str, str]:
    """The container's env as kubelet sets it; ``field_values`` answers fieldRef paths."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            env[item["name"]] = field_values[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (unknown names stay as written, as kubelet does)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


def args(c: Doc, env: Mapping[str, str]) -> list[str]:
    return [expand(a, env) for a in c.get("args", [])]


def flag(arguments: Sequence[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in arguments if a.startswith(f"{name}=")]
    assert len(values) == 1, f"expected one {name}=... in {arguments}"
    return values[0]


def volume(pod: Doc, name: str) -> Doc:
    found: list[Doc] = [v for v in pod["volumes"] if v["name"] == name]
    assert len(found) == 1, f"expected one volume {name}"
    return found[0]


def mount_of(c: Doc, path: PurePosixPath) -> Doc | None:
    """The volume mount that holds ``path`` in the container (the deepest one)."""
    holding = [m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    return max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts), default=None)


def host_path(pod: Doc, c: Doc, path: PurePosixPath) -> PurePosixPath | None:
    """Where ``path`` in container ``c`` lies on the node, if a hostPath volume holds it."""
    mount = mount_of(c, path)
    if mount is None:
        return None
    source = volume(pod, mount["name"]).get("hostPath")
    if source is None:
        return None
    inside = path.relative_to(mount["mountPath"])
    return PurePosixPath(str(source["path"]), str(mount.get("subPath", "")), inside)


def volume_files(pod: Doc, name: str, objects: Sequence[Doc]) -> dict[str, bytes]:
    """The files a configMap, secret or projected volume shows (relative path -> bytes).

    A Secret that does not exist and is ``optional`` shows nothing, as in kubelet.
    """
    spec = volume(pod, name)
    sources = spec["projected"]["sources"] if "projected" in spec else [spec]
    files: dict[str, bytes] = {}
    for source in sources:
        for kind, key in (("configMap", "name"), ("secret", "secretName")):
            if kind in source:
                ref = source[kind]
                obj = _object(objects, kind, ref.get(key) or ref["name"])
                if obj is None:
                    assert ref.get("optional"), f"{kind} {ref} is missing and not optional"
                    continue
                files.update(_items(obj, ref.get("items")))
    return files


def _object(objects: Sequence[Doc], kind: str, name: str) -> Doc | None:
    wanted = {"configMap": "ConfigMap", "secret": "Secret"}[kind]
    for obj in objects:
        if obj["kind"] == wanted and obj["metadata"]["name"] == name:
            return obj
    return None


def _items(obj: Doc, items: list[Doc] | None) -> dict[str, bytes]:
    data = (
        {k: v.encode() for k, v in obj.get("data", {}).items()}
        if obj["kind"] == "ConfigMap"
        else {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
    )
    if items is None:
        return data
    return {item["path"]: data[item["key"]] for item in items}


def probe_ports(c: Doc) -> dict[str, int]:
    """Probe kind -> the port number it targets (named ports resolved)."""
    named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
    found: dict[str, int] = {}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in c:
            port = c[kind]["httpGet"]["port"]
            found[kind] = named[port] if isinstance(port, str) else int(port)
    return found


def config_paths(config: Config) -> Iterator[tuple[str, PurePosixPath]]:
    """Every path the agent's configuration names, as ``(dotted key, path)``."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            if isinstance(value, Path):
                yield f"{section.name}.{item.name}", PurePosixPath(value)
    yield "csi.socket_path", PurePosixPath(config.csi.socket_path)


def rebase(root: Path, path: str | PurePosixPath) -> Path:
    return root / PurePosixPath(path).relative_to("/")


def rebase_strings(value: Any, root: Path, prefixes: Sequence[str]) -> Any:
    """``value`` (YAML data) with every absolute path under one of ``prefixes`` moved under
    ``root``; other values unchanged."""
    if isinstance(value, dict):
        return {k: rebase_strings(v, root, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [rebase_strings(v, root, prefixes) for v in value]
    if isinstance(value, str) and any(PurePosixPath(value).is_relative_to(p) for p in prefixes):
        return str(rebase(root, value))
    return value
