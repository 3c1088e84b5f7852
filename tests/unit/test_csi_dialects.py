"""Volume attributes of pods written for modelpack/model-csi-driver, and our view attributes."""

from __future__ import annotations

import pytest

from cacheagent.csi.attributes import parse_volume_context
from cacheagent.csi.dialects import translate_model_csi_driver
from cacheagent.csi.status import CsiFailure
from cacheagent.refs import ViewRef, parse_ref

REF = "registry.example.com/models/qwen3-0.6b:latest"
KUBELET = {
    "csi.storage.k8s.io/pod.name": "model-inference-pod",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0c7a9c52-1111-2222-3333-444455556666",
    "csi.storage.k8s.io/serviceAccount.name": "default",
    "csi.storage.k8s.io/ephemeral": "true",
}


def test_pod_exactly_as_model_csi_driver_docs_show() -> None:
    """docs/getting-started.md: only ``model.csi.modelpack.org/reference`` (plus what kubelet
    adds with podInfoOnMount)."""
    attrs = parse_volume_context({"model.csi.modelpack.org/reference": REF, **KUBELET})
    assert attrs.ref == parse_ref(REF)
    assert (attrs.mode, attrs.prefetch, attrs.pod.namespace) == ("bind", False, "default")


def test_every_documented_key_is_mapped() -> None:
    attrs = parse_volume_context(
        {
            "model.csi.modelpack.org/type": "image",
            "model.csi.modelpack.org/reference": REF,
            "model.csi.modelpack.org/mount-id": "mnt-1",
            "model.csi.modelpack.org/node-ip": "10.0.0.7",
            "model.csi.modelpack.org/check-disk-quota": "True",
            "model.csi.modelpack.org/exclude-model-weights": "1",
            "model.csi.modelpack.org/exclude-file-patterns": '["*.pth", "original/"]',
        }
    )
    assert isinstance(attrs.ref, ViewRef)
    assert attrs.ref.canonical == f"{REF}|exclude=*.pth,original/|exclude-weights"


@pytest.mark.parametrize(
    ("context", "problem"),
    [
        ({"model.csi.modelpack.org/reference": REF, "model": REF}, "not both"),
        (
            {"model.csi.modelpack.org/reference": REF, "model.csi.modelpack.org/type": "dataset"},
            "must be 'image'",
        ),
        (
            {"model.csi.modelpack.org/reference": REF, "model.csi.modelpack.org/refrence": "x"},
            "unknown model-csi-driver attribute",
        ),
        (
            {
                "model.csi.modelpack.org/reference": REF,
                "model.csi.modelpack.org/exclude-file-patterns": "not-valid-json",
            },
            "JSON array",
        ),
        (
            {
                "model.csi.modelpack.org/reference": REF,
                "model.csi.modelpack.org/exclude-file-patterns": '{"a": 1}',
            },
            "JSON array",
        ),
        (
            {
                "model.csi.modelpack.org/reference": REF,
                "model.csi.modelpack.org/exclude-model-weights": "notabool",
            },
            "boolean",
        ),
        (
            {
                "model.csi.modelpack.org/reference": REF,
                "model.csi.modelpack.org/check-disk-quota": "yes",
            },
            "boolean",
        ),
    ],
)
def test_bad_model_csi_driver_attributes_are_invalid_argument(
    context: dict[str, str], problem: str
) -> None:
    with pytest.raises(CsiFailure, match=problem):
        parse_volume_context(context)


def test_translation_leaves_other_keys_alone() -> None:
    context = {"model": REF, "mode": "lazy", **KUBELET}
    assert translate_model_csi_driver(context) == context


def test_view_attributes_make_a_view_ref() -> None:
    attrs = parse_volume_context(
        {
            "model": REF,
            "include": "*.json,tokenizer*",
            "exclude": "*.pth",
            "layout": "hf-cache",
            "hf-repo": "qwen/qwen3",
        }
    )
    assert (
        attrs.ref.canonical == f"{REF}|include=*.json,tokenizer*|exclude=*.pth|hf-cache=qwen/qwen3"
    )
    hf = parse_volume_context({"model": "hf://org/name@main", "layout": "hf-cache"})
    assert hf.ref.canonical == "hf://org/name@main|hf-cache=org/name"


@pytest.mark.parametrize(
    ("context", "problem"),
    [
        ({"model": REF, "layout": "flat"}, "'plain' or 'hf-cache'"),
        ({"model": REF, "hf-repo": "a/b"}, "needs 'layout: hf-cache'"),
        ({"model": REF, "layout": "hf-cache"}, "needs '=org/name'"),
        ({"model": REF, "include": "a,,b"}, "empty pattern"),
        ({"model": f"{REF}|include=*.json", "include": "*.txt"}, "given twice"),
        ({"model": REF, "exclude-weights": "yes"}, "'true' or 'false'"),
    ],
)
def test_bad_view_attributes_name_the_problem(context: dict[str, str], problem: str) -> None:
    with pytest.raises(CsiFailure, match=problem):
        parse_volume_context(context)
