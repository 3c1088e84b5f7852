"""The DaemonSet as kubelet would run it: its paths, sockets, probes, and the agent started from it.

Each test runs against the shipped kustomization and its kubelet-root variants (k0s, microk8s).
No cluster runs here, so ``test_the_agent_starts_as_the_daemonset_describes`` does what kubelet
would: it lays the agent container's volumes out under a temporary root (one directory per mount
path, ConfigMap and Secret files written in), rebases every path in the command line, the
environment and the config file under that root, gives the HTTP listener a free loopback port
(the stand-in for the pod's own network namespace), starts the image's entry point with the
container's args, and requires the readiness probe's path to answer 200.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from cacheagent.config import Config, load_config
from cacheagent.sockets import is_live
from tests import pod_spec
from tests.keeper_support import keeper_running
from tests.pod_spec import Doc
from tests.registry_server import free_port
from tests.serve_run import dockerfile_instructions, get, serving
from tests.support import require_binary, require_fuse

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "daemonset"
COMPONENTS = DEPLOY / "components"
NODE_NAME = "test-node"
KEEPER = "cacheagent-fuse-keeper"
K8S_VERSION = "1.32"

# variant name -> (components, kubelet root it must use)
VARIANTS = {
    "default": ((), "/var/lib/kubelet"),
    "k0s": (("kubelet-dir-k0s",), "/var/lib/k0s/kubelet"),
    "microk8s": (("kubelet-dir-microk8s",), "/var/snap/microk8s/common/var/lib/kubelet"),
}

REGISTRY_SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "cacheagent-registry"},
    "type": "kubernetes.io/dockerconfigjson",
    "data": {
        ".dockerconfigjson": base64.b64encode(
            json.dumps(
                {"auths": {"registry.example": {"auth": base64.b64encode(b"u:p").decode()}}}
            ).encode()
        ).decode()
    },
}


@dataclass
class Install:
    name: str
    kubelet_root: str
    docs: list[Doc]

    @property
    def pod(self) -> Doc:
        return pod_spec.pod_spec(self.docs)

    @property
    def agent(self) -> Doc:
        return pod_spec.container(self.pod, "agent")

    @property
    def keeper_pod(self) -> Doc:
        return pod_spec.pod_spec(self.docs, KEEPER)

    @property
    def keeper(self) -> Doc:
        return pod_spec.container(self.keeper_pod, "keeper")

    @property
    def registrar(self) -> Doc:
        return pod_spec.container(self.pod, "node-driver-registrar")

    def env(self) -> dict[str, str]:
        return pod_spec.environment(self.agent, {"spec.nodeName": NODE_NAME})

    def config(self, tmp: Path) -> Config:
        files = pod_spec.volume_files(self.pod, "config", self.docs)
        path = tmp / "config.yaml"
        path.write_bytes(files["config.yaml"])
        return load_config(path, self.env(), {})


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def install(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Install:
    kubectl = require_binary("kubectl")
    components, kubelet_root = VARIANTS[request.param]
    directory = DEPLOY
    if components:
        directory = pod_spec.write_overlay(
            tmp_path_factory.mktemp(f"overlay-{request.param}"),
            DEPLOY,
            [COMPONENTS / c for c in components],
        )
    return Install(request.param, kubelet_root, pod_spec.render(kubectl, directory))


def test_every_path_the_config_names_lies_under_a_mounted_volume(
    install: Install, tmp_path: Path
) -> None:
    config = install.config(tmp_path)
    files = pod_spec.volume_files(install.pod, "config", [*install.docs, REGISTRY_SECRET])
    for key, path in pod_spec.config_paths(config):
        mount = pod_spec.mount_of(install.agent, path)
        assert mount is not None, f"{key}={path} is not under any volume the agent mounts"
        source = pod_spec.volume(install.pod, mount["name"])
        if "hostPath" not in source:
            inside = str(path.relative_to(mount["mountPath"]))
            assert inside in files, f"{key}={path}: volume {mount['name']} has no {inside}"
        elif key in ("store.root", "agent.socket", "fuse.mountpoint", "csi.socket_path"):
            assert not mount.get("readOnly"), f"{key}={path} is on a read-only mount"


def test_the_registrar_registers_the_agents_csi_socket(install: Install, tmp_path: Path) -> None:
    config = install.config(tmp_path)
    on_host = pod_spec.host_path(install.pod, install.agent, PurePosixPath(config.csi.socket_path))
    assert on_host == PurePosixPath(
        install.kubelet_root, "plugins", config.csi.driver_name, "csi.sock"
    )
    env = pod_spec.environment(install.registrar, {})
    arguments = pod_spec.args(install.registrar, env)
    assert PurePosixPath(pod_spec.flag(arguments, "--kubelet-registration-path")) == on_host
    address = PurePosixPath(pod_spec.flag(arguments, "--csi-address"))
    assert pod_spec.host_path(install.pod, install.registrar, address) == on_host
    registration = pod_spec.host_path(
        install.pod, install.registrar, PurePosixPath("/registration")
    )
    assert registration == PurePosixPath(install.kubelet_root, "plugins_registry")


def test_the_csidriver_name_is_the_agents_driver_name(install: Install, tmp_path: Path) -> None:
    driver = pod_spec.find(install.docs, "CSIDriver")
    assert driver["metadata"]["name"] == install.config(tmp_path).csi.driver_name


def test_probes_target_ports_the_containers_listen_on(install: Install, tmp_path: Path) -> None:
    config = install.config(tmp_path)
    listen_port = int(config.agent.http_listen.rpartition(":")[2])
    agent_probes = pod_spec.probe_ports(install.agent)
    assert set(agent_probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert set(agent_probes.values()) == {listen_port}
    registrar_probes = pod_spec.probe_ports(install.registrar)
    endpoint = pod_spec.flag(pod_spec.args(install.registrar, {}), "--http-endpoint")
    assert registrar_probes == {"livenessProbe": int(endpoint.rpartition(":")[2])}


def test_the_kubelet_root_is_the_variants_everywhere(install: Install) -> None:
    daemonset = yaml.safe_dump(pod_spec.find(install.docs, "DaemonSet", "cacheagent"))
    if install.kubelet_root != "/var/lib/kubelet":
        assert not re.search(r"(?<![\w.-])/var/lib/kubelet", daemonset)
    assert install.kubelet_root in daemonset


def test_no_agent_mount_is_stacked_inside_a_bidirectional_one(install: Install) -> None:
    mounts = install.agent["volumeMounts"]
    for outer in (m for m in mounts if m.get("mountPropagation") == "Bidirectional"):
        for inner in mounts:
            assert inner is outer or not PurePosixPath(inner["mountPath"]).is_relative_to(
                outer["mountPath"]
            ), f"{inner['mountPath']} is mounted inside Bidirectional {outer['mountPath']}"


# -- the FUSE keeper --------------------------------------------------------------------------


def test_the_keeper_is_replaced_only_on_delete_and_holds_no_privilege(install: Install) -> None:
    daemonset = pod_spec.find(install.docs, "DaemonSet", KEEPER)
    assert daemonset["spec"]["updateStrategy"] == {"type": "OnDelete"}
    security = install.keeper["securityContext"]
    assert security["runAsUser"] == 0, "the socket must be root's alone"
    assert "privileged" not in security and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["readOnlyRootFilesystem"] is True
    assert install.keeper["resources"]["limits"]["memory"]
    assert [m["name"] for m in install.keeper["volumeMounts"]] == ["keeper-dir"]


def test_the_keeper_lands_where_the_agent_does(install: Install, tmp_path: Path) -> None:
    for docs in (install.docs, _with_gpu_nodes(install, tmp_path)):
        agent, keeper = pod_spec.pod_spec(docs), pod_spec.pod_spec(docs, KEEPER)
        for key in ("tolerations", "priorityClassName", "nodeSelector", "affinity"):
            assert keeper.get(key) == agent.get(key), key


def _with_gpu_nodes(install: Install, tmp_path: Path) -> list[Doc]:
    components = [COMPONENTS / c for c in (*VARIANTS[install.name][0], "gpu-nodes")]
    overlay = pod_spec.write_overlay(tmp_path / "gpu", DEPLOY, components)
    docs = pod_spec.render(require_binary("kubectl"), overlay)
    assert pod_spec.pod_spec(docs)["nodeSelector"], "gpu-nodes narrowed nothing"
    return docs


def test_the_agents_keeper_socket_is_the_keepers(install: Install, tmp_path: Path) -> None:
    configured = install.config(tmp_path).fuse.keeper_socket
    assert configured is not None, "the install runs a keeper the agent does not use"
    served = PurePosixPath(_keeper_socket_argument(pod_spec.args(install.keeper, {})))
    on_host = pod_spec.host_path(install.keeper_pod, install.keeper, served)
    assert on_host is not None, f"the keeper's socket {served} is on no hostPath volume"
    assert pod_spec.host_path(install.pod, install.agent, PurePosixPath(configured)) == on_host


def _keeper_socket_argument(arguments: list[str]) -> str:
    assert arguments[0] == "fuse-keeper", arguments
    return arguments[arguments.index("--socket") + 1]


# -- the agent started as the DaemonSet describes ------------------------------------------------


def _entrypoint() -> list[str]:
    """The image's ENTRYPOINT (the container has no ``command``), found in this venv."""
    (line,) = dockerfile_instructions(ROOT / "Dockerfile", "ENTRYPOINT")
    words: list[str] = json.loads(line)
    binary = Path(sys.executable).parent / words[0]
    assert binary.exists(), f"{words[0]} is not installed in {binary.parent}"
    return [str(binary), *words[1:]]


@dataclass
class Laid:
    root: Path
    command: list[str]
    env: dict[str, str]
    port: int
    readiness_path: str


def lay_out(install: Install, root: Path, with_secret: bool) -> Laid:
    """Create the agent's volumes under ``root`` and rebase what names them."""
    agent, pod = install.agent, install.pod
    objects = [*install.docs, *([REGISTRY_SECRET] if with_secret else [])]
    prefixes = []
    for mount in agent["volumeMounts"]:
        source = pod_spec.volume(pod, mount["name"])
        if source.get("hostPath", {}).get("type") == "CharDevice":
            assert mount["mountPath"] == source["hostPath"]["path"]
            continue  # /dev/fuse: the real device (require_fuse)
        prefixes.append(mount["mountPath"])
        target = pod_spec.rebase(root, mount["mountPath"])
        target.mkdir(parents=True, exist_ok=True)
        if "hostPath" not in source:
            for name, data in pod_spec.volume_files(pod, mount["name"], objects).items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                (target / name).write_bytes(data)
    port = free_port()
    arguments = pod_spec.rebase_strings(pod_spec.args(agent, install.env()), root, prefixes)
    config_file = Path(arguments[arguments.index("--config") + 1])
    assert config_file.is_relative_to(root), f"--config {config_file} is on no volume"
    config = pod_spec.rebase_strings(yaml.safe_load(config_file.read_text()), root, prefixes)
    config["agent"]["http_listen"] = f"127.0.0.1:{port}"
    config_file.write_text(yaml.safe_dump(config))
    env = pod_spec.rebase_strings(install.env(), root, prefixes)
    probe = agent["readinessProbe"]["httpGet"]
    assert "command" not in agent
    return Laid(root, [*_entrypoint(), *arguments], env, port, probe["path"])


@pytest.fixture
def short_root() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes: a short root under /tmp."""
    root = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp"))
    yield root
    leftover = _mounts_under(root)
    for mount in reversed(leftover):
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False, timeout=60)
    assert not leftover, f"the agent left mounts behind: {leftover}"


def _mounts_under(root: Path) -> list[Path]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].replace("\\040", " "))
        if point.is_relative_to(root):
            found.append(point)
    return found


def lay_out_keeper(install: Install, root: Path) -> tuple[list[str], Path]:
    """The keeper's hostPath volumes under ``root``: its command line and socket there."""
    keeper = install.keeper
    assert "command" not in keeper
    prefixes = []
    for mount in keeper["volumeMounts"]:
        source = pod_spec.volume(install.keeper_pod, mount["name"])
        # Rebasing goes by mount path: it is the node's path too, as in the agent's pod.
        assert source["hostPath"]["path"] == mount["mountPath"], mount
        pod_spec.rebase(root, mount["mountPath"]).mkdir(parents=True, exist_ok=True)
        prefixes.append(mount["mountPath"])
    arguments = pod_spec.rebase_strings(pod_spec.args(keeper, {}), root, prefixes)
    return [*_entrypoint(), *arguments], Path(_keeper_socket_argument(arguments))


def test_the_agent_starts_as_the_daemonset_describes(install: Install, short_root: Path) -> None:
    require_fuse()
    with_secret = install.name == "k0s"  # one variant with the optional Secret present
    keeper_command, keeper_socket = lay_out_keeper(install, short_root)
    laid = lay_out(install, short_root, with_secret)
    log_path = short_root / "agent.log"
    env = {"PATH": os.environ["PATH"], **laid.env}
    ready = f"http://127.0.0.1:{laid.port}{laid.readiness_path}"
    config_file = Path(laid.command[laid.command.index("--config") + 1])
    configured = load_config(config_file, laid.env, {}).fuse.keeper_socket
    assert configured == keeper_socket, "the agent is configured with another keeper socket"
    fuse = pod_spec.rebase(short_root, "/run/cacheagent/fuse")
    with keeper_running(keeper_socket, short_root / "keeper.log", keeper_command):
        with serving(laid.command, env, ready, log_path):
            assert get(f"http://127.0.0.1:{laid.port}/healthz")[0] == 200
            assert fuse in _mounts_under(short_root), "ready without the FUSE mount"
            assert is_live(keeper_socket, socket.SOCK_SEQPACKET), "the keeper stopped serving"
        # An agent that hands its FUSE connection over leaves the mount to its successor
        # (the keeper holds it): intended, not a leak. No successor comes here.
        if fuse in _mounts_under(short_root):
            subprocess.run(["umount", "-l", str(fuse)], check=True, timeout=30)
    assert not keeper_socket.exists(), "the keeper left its socket behind"
    text = log_path.read_text()
    warned = "registries.docker_config" in text and "does not exist" in text
    assert warned is not with_secret, text
    plugins = pod_spec.rebase(short_root, install.kubelet_root) / "plugins"
    assert (plugins / "model.cacheagent.io").is_dir()


def test_every_variant_validates_against_the_kubernetes_schemas(install: Install) -> None:
    for doc in install.docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
