"""The image's build, run here: the Dockerfile's build stage (generated protos, a wheel), the
wheel installed into a fresh virtual environment, and its entry point run with the image's CMD.

Only the base image and apt packages are left out. The fresh environment gets the wheel and
nothing else; the wheel's dependencies come from this checkout's venv through a path file,
since nothing can be downloaded here, and the test checks that each one is there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.registry_server import free_port
from tests.serve_run import dockerfile_instructions, get, serving

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
RUN_TIMEOUT = 300


def _instructions(name: str) -> list[str]:
    return dockerfile_instructions(DOCKERFILE, name)


def _build_stage_copies() -> list[str]:
    """What the build stage copies from the context (``COPY src... dest``, no --from)."""
    sources = []
    for args in _instructions("COPY"):
        if not args.startswith("--from"):
            sources.extend(args.split()[:-1])
    return sources


def _run(*command: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's build stage on a clean copy of the sources (no generated code)."""
    build = "\n".join(_instructions("RUN"))
    assert "scripts/gen_protos.py --force" in build and "pip wheel" in build
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "_proto", "*.egg-info")
    for name in _build_stage_copies():
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "scripts/gen_protos.py", "--force", cwd=src)
    wheels = tmp_path_factory.mktemp("wheels")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", wheels, src,
    )  # fmt: skip
    (built,) = wheels.glob("cacheagent-*.whl")
    names = zipfile.ZipFile(built).namelist()
    assert "cacheagent/_proto/csi/v1/csi_pb2.py" in names
    assert "cacheagent/_proto/cacheagent/v1/agent_pb2_grpc.py" in names
    return built


@pytest.fixture(scope="module")
def fresh(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the wheel installed; returns its bin directory."""
    venv = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel
    )
    site = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


CHECK = """
import json, importlib.metadata as md, re, cacheagent
missing = [r for r in md.requires("cacheagent") or [] if "extra ==" not in r
           and not _found(re.match(r"[A-Za-z0-9_.-]+", r)[0])]
print(json.dumps({"file": cacheagent.__file__, "missing": missing}))
"""


def test_the_wheel_is_what_the_fresh_venv_imports(fresh: Path) -> None:
    code = (
        "import importlib.metadata as md\n"
        "def _found(name):\n"
        "    try:\n        md.distribution(name)\n    except md.PackageNotFoundError:\n"
        "        return False\n    return True\n" + CHECK
    )
    found = json.loads(_run(fresh / "python", "-c", code, cwd=fresh))
    assert Path(found["file"]).is_relative_to(fresh.parent), found
    assert found["missing"] == []


def test_version_from_the_entry_point(fresh: Path) -> None:
    from cacheagent import __version__

    assert _run(fresh / "cacheagent", "--version").strip() == f"cacheagent {__version__}"


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ca-", dir="/tmp"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serve_with_the_images_cmd(fresh: Path, run_dir: Path) -> None:
    (entrypoint,) = [json.loads(e) for e in _instructions("ENTRYPOINT")]
    (cmd,) = [json.loads(c) for c in _instructions("CMD")]
    port = free_port()
    config = {
        "store": {"root": str(run_dir / "store")},
        "agent": {"socket": str(run_dir / "agent.sock"), "http_listen": f"127.0.0.1:{port}"},
        "csi": {"kubelet_dir": str(run_dir / "kubelet"), "node_id": "image-test"},
        "fuse": {"enabled": False},
    }
    (run_dir / "kubelet").mkdir()
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [str(fresh / entrypoint[0]), *entrypoint[1:]]
    command += [str(config_path) if a == "/etc/cacheagent/config.yaml" else a for a in cmd]
    assert str(config_path) in command, f"the image's CMD names no config file: {cmd}"
    env = {"PATH": os.environ["PATH"]}
    with serving(command, env, f"http://127.0.0.1:{port}/readyz", run_dir / "agent.log"):
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
