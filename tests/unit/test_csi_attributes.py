"""Volume attributes: every accepted key, every refusal naming the bad key (pure)."""

from __future__ import annotations

import grpc
import pytest

from cacheagent.csi.attributes import PodInfo, parse_volume_context
from cacheagent.csi.status import CsiFailure
from cacheagent.refs import parse_ref

MODEL = "registry.example.com/models/qwen2.5-0.5b:v1"


def refusal(context: dict[str, str]) -> str:
    with pytest.raises(CsiFailure) as info:
        parse_volume_context(context)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return info.value.message


def test_defaults() -> None:
    attrs = parse_volume_context({"model": MODEL})
    assert attrs.ref == parse_ref(MODEL)
    assert (attrs.mode, attrs.prefetch, attrs.gpus, attrs.pod) == ("bind", False, (), PodInfo())


def test_every_accepted_key() -> None:
    attrs = parse_volume_context(
        {
            "model": "oci://registry.example.com/models/qwen2.5-0.5b:v1",
            "mode": "lazy",
            "prefetch": "True",
            "gpus": " 0, GPU-8f1c2d3e-aaaa-bbbb-cccc-0123456789ab,1,0",
            "csi.storage.k8s.io/pod.name": "infer-0",
            "csi.storage.k8s.io/pod.namespace": "team-a",
            "csi.storage.k8s.io/pod.uid": "u-1",
            "csi.storage.k8s.io/serviceAccount.name": "sa",
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/serviceAccount.tokens": "{}",  # ignored
        }
    )
    assert attrs.ref.canonical == MODEL
    assert (attrs.mode, attrs.prefetch) == ("lazy", True)
    assert attrs.gpus == ("0", "GPU-8f1c2d3e-aaaa-bbbb-cccc-0123456789ab", "1")
    assert attrs.pod == PodInfo("infer-0", "team-a", "u-1", "sa", ephemeral=True)


def test_model_is_required() -> None:
    assert "'model' is required" in refusal({})
    assert "'model' is required" in refusal({"model": ""})


def test_malformed_model_names_the_part() -> None:
    message = refusal({"model": "hf://org/name"})
    assert "'model'" in message and "revision" in message


def test_unknown_keys_are_named_sorted() -> None:
    message = refusal({"model": MODEL, "prefech": "true", "modle": "x"})
    assert "'modle', 'prefech'" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", "copy"),
        ("mode", "Bind"),
        ("prefetch", "yes"),
        ("prefetch", ""),
        ("gpus", "0,,1"),
        ("gpus", "gpu0"),
        ("gpus", ",".join(str(i) for i in range(65))),
        ("csi.storage.k8s.io/ephemeral", "maybe"),
    ],
)
def test_bad_values_name_their_key(key: str, value: str) -> None:
    assert repr(key) in refusal({"model": MODEL, key: value})
