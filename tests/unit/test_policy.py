"""Policy decisions over canonical references: sources, and namespaces that may mount."""

from __future__ import annotations

import ipaddress
import re

import pytest

from cacheagent.config import PolicyConfig, load_config
from cacheagent.errors import ConfigError, PolicyDeniedError
from cacheagent.policy import (
    address_allowed,
    check_lazy,
    check_mount,
    check_pod_ref,
    check_source,
    redirect_allowed,
)
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


# -- the pod trust boundary ------------------------------------------------------------------

DEFAULT = PolicyConfig()


def test_pods_may_name_registry_refs_by_default() -> None:
    check_pod_ref(DEFAULT, parse_ref("registry.local/models/qwen:v1"))
    check_pod_ref(DEFAULT, parse_ref("oci://127.0.0.1:5000/m@sha256:" + H))


@pytest.mark.parametrize(
    ("ref", "rule"),
    [
        ("oci-layout:///var/lib/kubelet/pods/x/volumes/e/layout:v1", "policy.pod_layout_roots"),
        ("oci-layout:///srv/models/q:v1", "policy.pod_layout_roots"),
        ("https://models.example.com/w.bin#sha256=" + H, "policy.pod_http_hosts"),
        ("http://169.254.169.254/latest#sha256=" + H, "policy.pod_http_hosts"),
        ("hf://org/name@main", "policy.pod_hf"),
    ],
)
def test_pods_may_not_name_other_sources_by_default(ref: str, rule: str) -> None:
    with pytest.raises(PolicyDeniedError, match=re.escape(rule)) as caught:
        check_pod_ref(DEFAULT, parse_ref(ref))
    assert caught.value.rule == rule


WIDER = load_config(
    None,
    {},
    {
        "policy.pod_hf": "true",
        "policy.pod_layout_roots": "/srv/models",
        "policy.pod_http_hosts": "models.example.com,*.cdn.example.com,files.lan:8443",
    },
).policy


@pytest.mark.parametrize(
    "ref",
    [
        "hf://org/name@main",
        "oci-layout:///srv/models:v1",
        "oci-layout:///srv/models/team/q:v1",
        "https://models.example.com/w.bin#sha256=" + H,
        "https://MODELS.example.com:443/w.bin#sha256=" + H,
        "https://eu.cdn.example.com/w.bin#sha256=" + H,
        "https://files.lan:8443/w.bin#sha256=" + H,
    ],
)
def test_policy_rules_widen_what_pods_may_name(ref: str) -> None:
    check_pod_ref(WIDER, parse_ref(ref))


@pytest.mark.parametrize(
    "ref",
    [
        "oci-layout:///srv/models-evil/q:v1",  # a prefix of the root's name is not below it
        "oci-layout:///srv/q:v1",
        "https://models.example.com.evil.net/w.bin#sha256=" + H,
        "https://files.lan:9000/w.bin#sha256=" + H,  # the port is part of that rule
    ],
)
def test_widened_rules_still_refuse_near_misses(ref: str) -> None:
    with pytest.raises(PolicyDeniedError):
        check_pod_ref(WIDER, parse_ref(ref))


def test_lazy_mode_only_for_lazy_sources() -> None:
    check_lazy(DEFAULT, parse_ref("registry.local/m:v1"))
    with pytest.raises(PolicyDeniedError, match=r"policy\.lazy_sources") as caught:
        check_lazy(WIDER, parse_ref("oci-layout:///srv/models/q:v1"))
    assert "mode: bind" in str(caught.value)
    lazy_layouts = PolicyConfig(lazy_sources=("oci", "oci-layout"))
    check_lazy(lazy_layouts, parse_ref("oci-layout:///srv/models/q:v1"))
    with pytest.raises(PolicyDeniedError):
        check_lazy(PolicyConfig(lazy_sources=()), parse_ref("registry.local/m:v1"))


# -- HTTP origins ----------------------------------------------------------------------------


def test_redirects_stay_on_the_host_or_go_to_allowed_hosts() -> None:
    policy = PolicyConfig(pod_http_hosts=("models.example.com",), http_redirect_hosts=("*.s3.aws",))
    assert redirect_allowed(policy, "origin.lan:8080", "origin.lan:8080")
    assert redirect_allowed(policy, "origin.lan:8080", "bucket.s3.aws")
    assert redirect_allowed(policy, "origin.lan:8080", "models.example.com")
    assert not redirect_allowed(policy, "origin.lan:8080", "origin.lan:9090")
    assert not redirect_allowed(policy, "origin.lan", "169.254.169.254")
    assert not redirect_allowed(DEFAULT, "a.example.com", "b.example.com")


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "0.0.0.0", "::ffff:127.0.0.1"],
)
def test_loopback_and_link_local_refused_unless_configured(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert not address_allowed(DEFAULT, ip)
    opened = PolicyConfig(
        http_allowed_networks=("127.0.0.0/8", "::/0", "169.254.0.0/16", "0.0.0.0/32")
    )
    assert address_allowed(opened, ip)


@pytest.mark.parametrize("address", ["10.1.2.3", "93.184.216.34", "2606:4700::1111"])
def test_other_addresses_allowed(address: str) -> None:
    assert address_allowed(DEFAULT, ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("policy.pod_layout_roots", "relative/dir", "absolute"),
        ("policy.pod_layout_roots", "/srv/../etc", "without '..'"),
        ("policy.pod_layout_roots", "/", "below /"),
        ("policy.pod_http_hosts", "https://host/path", "no scheme"),
        ("policy.http_redirect_hosts", "a b", "host name or glob"),
        ("policy.http_allowed_networks", "127.0.0.0/33", "IP network"),
        ("policy.lazy_sources", "oci,ftp", "expected one of"),
        ("policy.pod_hf", "maybe", "true or false"),
    ],
)
def test_policy_keys_are_validated(key: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key) + r"(\[\d+\])?: .*" + re.escape(problem)):
        load_config(None, {}, {key: value})
