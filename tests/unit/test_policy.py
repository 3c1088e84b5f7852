"""Policy decisions over canonical references: sources, and namespaces that may mount."""

from __future__ import annotations

import pytest

from cacheagent.config import PolicyConfig, load_config
from cacheagent.errors import PolicyDeniedError
from cacheagent.policy import check_mount, check_source
from cacheagent.refs import parse_ref

H = "ab" * 32

SOURCES = PolicyConfig(
    allowed_sources=(
        "registry.local/models/*",
        "oci://mirror.lan:5000/*",
        "oci-layout:///srv/*",
        "hf://*",
    )
)


@pytest.mark.parametrize(
    "ref",
    [
        "registry.local/models/qwen:v1",
        "registry.local/models/team/deep/qwen@sha256:" + H,
        "mirror.lan:5000/anything:v",
        "oci-layout:///srv/models/q:v1",
        "hf://org/name@main",
    ],
)
def test_allowed_sources_accept_matching_refs(ref: str) -> None:
    check_source(SOURCES, parse_ref(ref))


@pytest.mark.parametrize(
    "ref",
    [
        "registry.local/other/qwen:v1",
        "registry.local.evil.example/models/qwen:v1",
        "ubuntu",
        "oci-layout:///home/u/m:v1",
        f"https://files.example.com/f#sha256={H}",
    ],
)
def test_allowed_sources_refuse_the_rest(ref: str) -> None:
    parsed = parse_ref(ref)
    with pytest.raises(PolicyDeniedError) as caught:
        check_source(SOURCES, parsed)
    assert caught.value.rule == "policy.allowed_sources"
    assert parsed.canonical in str(caught.value)


def test_empty_policy_allows_everything() -> None:
    policy = PolicyConfig()
    ref = parse_ref("anything.example/x/y:z")
    check_source(policy, ref)
    check_mount(policy, "ns", ref)
    check_mount(policy, None, ref)


NAMESPACES = PolicyConfig(
    namespaces={
        "ml-prod": ("registry.local/models/*:v*",),
        "ml-*": ("registry.local/models/*", "hf://*"),
        "kube-system": (),
    }
)


@pytest.mark.parametrize(
    ("namespace", "ref"),
    [
        ("ml-prod", "registry.local/models/qwen:v1"),
        ("ml-dev", "registry.local/models/qwen:latest"),
        ("ml-dev", "hf://org/name@main"),
    ],
)
def test_namespace_rules_allow(namespace: str, ref: str) -> None:
    check_mount(NAMESPACES, namespace, parse_ref(ref))


@pytest.mark.parametrize(
    ("namespace", "ref", "rule"),
    [
        # first matching rule wins: ml-prod is not rescued by the broader ml-* rule
        ("ml-prod", "registry.local/models/qwen:latest", "policy.namespaces['ml-prod']"),
        ("ml-prod", "hf://org/name@main", "policy.namespaces['ml-prod']"),
        ("ml-dev", "registry.local/other/x:v1", "policy.namespaces['ml-*']"),
        ("kube-system", "registry.local/models/qwen:v1", "policy.namespaces['kube-system']"),
        ("default", "registry.local/models/qwen:v1", "policy.namespaces"),
        (None, "registry.local/models/qwen:v1", "policy.namespaces"),
    ],
)
def test_namespace_rules_deny_naming_the_rule(namespace: str | None, ref: str, rule: str) -> None:
    with pytest.raises(PolicyDeniedError) as caught:
        check_mount(NAMESPACES, namespace, parse_ref(ref))
    assert caught.value.rule == rule
    assert rule in str(caught.value)


def test_mount_rules_do_not_apply_source_rules() -> None:
    policy = PolicyConfig(allowed_sources=("hf://*",), namespaces={"*": ("*",)})
    ref = parse_ref("registry.local/models/qwen:v1")
    check_mount(policy, "any", ref)
    with pytest.raises(PolicyDeniedError):
        check_source(policy, ref)


def test_rule_order_from_yaml_is_kept() -> None:
    config = load_config(
        None,
        {"CACHEAGENT_POLICY__NAMESPACES": "{a-x: [hf://*], a-*: ['*']}"},
        {},
    )
    with pytest.raises(PolicyDeniedError) as caught:
        check_mount(config.policy, "a-x", parse_ref("ubuntu"))
    assert caught.value.rule == "policy.namespaces['a-x']"
    check_mount(config.policy, "a-y", parse_ref("ubuntu"))
