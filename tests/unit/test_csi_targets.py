"""Target paths: the lexical rules (pure) and the symlink-refusing walk (real directories)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from cacheagent.csi.status import CsiFailure
from cacheagent.csi.targets import (
    KubeletDir,
    check_target,
    leaf_kind,
    make_target_dir,
    open_parent,
    remove_target_dir,
)

KUBELET = KubeletDir(configured="/var/lib/kubelet", real="/data/kubelet")
TARGET = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/model/mount"


def test_accepts_paths_under_either_spelling_of_the_kubelet_dir() -> None:
    for text in (TARGET, TARGET + "/", TARGET.replace("/var/lib/kubelet", "/data/kubelet")):
        target = check_target(text, KUBELET)
        assert target.path == "/data/kubelet/pods/u1/volumes/kubernetes.io~csi/model/mount"
        assert target.parts == ("pods", "u1", "volumes", "kubernetes.io~csi", "model", "mount")
        assert target.name == "mount"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pods/u1/mount", "absolute"),
        ("/var/lib/kubelet/pods/../../../etc", "normalised"),
        ("/var/lib/kubelet/pods/./u1", "normalised"),
        ("/var/lib/kubelet//pods/u1", "normalised"),
        ("/var/lib/kubelet", "not under"),
        ("/var/lib/kubeletx/pods/u1", "not under"),
        ("/etc/passwd", "not under"),
        ("/var/lib/kubelet/pods/u1\0/mount", "control characters"),
        ("/var/lib/kubelet/pods/u1\n/mount", "control characters"),
        ("/var/lib/kubelet/" + "x" * 5000, "the limit is 4096 bytes"),
        ("/var/lib/kubelet/pods/" + "x" * 256 + "/mount", "255 bytes per component"),
    ],
)
def test_refusals_name_the_field(text: str, problem: str) -> None:
    with pytest.raises(CsiFailure) as info:
        check_target(text, KUBELET, "volume_path")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in info.value.message and "volume_path" in info.value.message


def test_a_symlinked_pods_dir_is_walked_from_its_real_path(tmp_path: Path) -> None:
    """k0s, microk8s and k3s installs (and pods on another disk) symlink <kubelet dir>/pods."""
    (tmp_path / "kubelet").mkdir()
    real_pods = tmp_path / "disk" / "pods"
    (real_pods / "u1" / "volumes").mkdir(parents=True)
    (tmp_path / "kubelet" / "pods").symlink_to(real_pods)
    kubelet = KubeletDir.resolve(tmp_path / "kubelet")
    assert kubelet.pods_real == str(real_pods)
    for spelling in (tmp_path / "kubelet" / "pods", real_pods):
        target = check_target(f"{spelling}/u1/volumes/mount", kubelet)
        assert target.path == f"{real_pods}/u1/volumes/mount"
        assert (target.base, target.parts) == (str(real_pods), ("u1", "volumes", "mount"))
        with open_parent(target) as parent:
            assert parent is not None
            make_target_dir(parent, target)
        assert (real_pods / "u1" / "volumes" / "mount").is_dir()
        (real_pods / "u1" / "volumes" / "mount").rmdir()
    assert kubelet.mount_dirs == (str(tmp_path / "kubelet"), str(real_pods))
    # Other symlinks below the kubelet directory are still refused.
    (real_pods / "u2").symlink_to(tmp_path)
    with (
        pytest.raises(CsiFailure) as info,
        open_parent(check_target(f"{real_pods}/u2/x/mount", kubelet)),
    ):
        pass
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def kubelet(tmp_path: Path) -> KubeletDir:
    (tmp_path / "kubelet" / "pods" / "u1" / "volumes").mkdir(parents=True)
    return KubeletDir.resolve(tmp_path / "kubelet")


def test_walk_opens_the_parent_and_creates_the_target_0750(kubelet: KubeletDir) -> None:
    target = check_target(f"{kubelet.real}/pods/u1/volumes/mount", kubelet)
    old = os.umask(0o022)
    try:
        with open_parent(target) as parent:
            assert parent is not None
            assert leaf_kind(parent, target) == "missing"
            make_target_dir(parent, target)
            make_target_dir(parent, target)  # idempotent
            assert leaf_kind(parent, target) == "dir"
    finally:
        os.umask(old)
    assert oct(Path(target.path).stat().st_mode & 0o777) == oct(0o750)


def test_walk_reports_a_missing_parent(kubelet: KubeletDir) -> None:
    target = check_target(f"{kubelet.real}/pods/u2/volumes/mount", kubelet)
    with open_parent(target) as parent:
        assert parent is None


def test_walk_refuses_symlinks_anywhere_below_the_kubelet_dir(
    kubelet: KubeletDir, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    (outside / "volumes").mkdir(parents=True)
    Path(kubelet.real, "pods", "evil").symlink_to(outside)
    middle = check_target(f"{kubelet.real}/pods/evil/volumes/mount", kubelet)
    with pytest.raises(CsiFailure) as info, open_parent(middle):
        pass
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "'pods/evil'" in info.value.message

    Path(kubelet.real, "pods", "u1", "volumes", "mount").symlink_to(outside)
    leaf = check_target(f"{kubelet.real}/pods/u1/volumes/mount", kubelet)
    with open_parent(leaf) as parent:
        assert parent is not None
        with pytest.raises(CsiFailure) as info:
            make_target_dir(parent, leaf)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert os.listdir(outside) == ["volumes"]


def test_a_file_as_target_is_refused(kubelet: KubeletDir) -> None:
    Path(kubelet.real, "pods", "u1", "volumes", "mount").write_text("x")
    target = check_target(f"{kubelet.real}/pods/u1/volumes/mount", kubelet)
    with open_parent(target) as parent, pytest.raises(CsiFailure) as info:
        assert parent is not None
        leaf_kind(parent, target)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_remove_keeps_a_non_empty_directory(kubelet: KubeletDir) -> None:
    target = check_target(f"{kubelet.real}/pods/u1/volumes/mount", kubelet)
    with open_parent(target) as parent:
        assert parent is not None
        make_target_dir(parent, target)
        Path(target.path, "left-over").write_text("x")
        remove_target_dir(parent, target)
        assert Path(target.path, "left-over").exists()
        Path(target.path, "left-over").unlink()
        remove_target_dir(parent, target)
        remove_target_dir(parent, target)  # already gone: fine
    assert not Path(target.path).exists()


def test_kubelet_dir_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        KubeletDir.resolve("var/lib/kubelet")
