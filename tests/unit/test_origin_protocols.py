"""The pure protocol pieces of the origins: presigned-URL deadlines, Hub error codes, registry
``errors[]`` bodies, ``NO_PROXY`` matching and the credential-helper parts of config.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from yarl import URL

from cacheagent.errors import ConfigError, ModelNotFoundError, SourceError
from cacheagent.sources.credentials import parse_docker_config_file
from cacheagent.sources.hf_protocol import HfAccessError, hub_error, presigned_expiry
from cacheagent.sources.registry_errors import describe_errors
from cacheagent.sources.transport import environment_proxies, no_proxy_matches

SIGNED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("url", "expiry"),
    [
        ("https://cdn-lfs.hf.co/x?Expires=1767323045&Signature=s&Key-Pair-Id=k", 1767323045.0),
        (
            "https://cas-bridge.xethub.hf.co/x?X-Amz-Date=20260102T030405Z&X-Amz-Expires=3600"
            "&X-Amz-Signature=s",
            SIGNED_AT.timestamp() + 3600,
        ),
        ("https://cdn.example/x?X-Amz-Date=garbage&X-Amz-Expires=3600", None),
        ("https://cdn.example/x", None),
    ],
)
def test_presigned_expiry(url: str, expiry: float | None) -> None:
    assert presigned_expiry(URL(url)) == expiry


@pytest.mark.parametrize(
    ("code", "status", "error", "words"),
    [
        ("GatedRepo", 403, HfAccessError, "gated repository"),
        ("RepoNotFound", 404, ModelNotFoundError, "repository not found"),
        ("RevisionNotFound", 404, ModelNotFoundError, "revision not found"),
        ("EntryNotFound", 404, ModelNotFoundError, "file not found"),
        ("DisabledRepo", 403, HfAccessError, "disabled"),
        ("SomethingNew", 400, SourceError, "400 SomethingNew"),
    ],
)
def test_hub_error_codes(code: str, status: int, error: type[Exception], words: str) -> None:
    headers = {"X-Error-Code": code, "X-Error-Message": "the Hub's words\x1b[31m"}
    found = hub_error(status, headers, what="hf://a/b", origin="hub", token_configured=True)
    assert isinstance(found, error)
    assert words in str(found) and "the Hub's words" in str(found)
    assert "\x1b" not in str(found)  # terminal escapes from the server are not passed on


def test_no_hub_error_code_is_no_hub_error() -> None:
    assert hub_error(404, {}, what="x", origin="hub", token_configured=False) is None


def test_describe_errors() -> None:
    body = {"errors": [{"code": "DENIED", "message": "denied", "detail": {"Tag": "v1"}}]}
    assert describe_errors(json.dumps(body).encode()) == 'DENIED: denied ({"Tag":"v1"})'
    assert describe_errors(b"plain text\nfrom a proxy") == "plain text from a proxy"
    assert describe_errors(b"") == ""
    assert len(describe_errors(b"x" * 10_000)) == 400


@pytest.mark.parametrize(
    ("url", "no_proxy", "bypass"),
    [
        ("https://registry.internal/v2/", "registry.internal", True),
        ("https://a.registry.internal/v2/", ".registry.internal", True),
        ("https://a.registry.internal/v2/", "registry.internal", True),
        ("https://registry.internal.evil/v2/", "registry.internal", False),
        ("https://r.example:5000/", "r.example:5000", True),
        ("https://r.example:5001/", "r.example:5000", False),
        ("https://anything/", "*", True),
        ("https://huggingface.co/", "", False),
        ("https://huggingface.co/", " , ,", False),
    ],
)
def test_no_proxy_matches(url: str, no_proxy: str, bypass: bool) -> None:
    assert no_proxy_matches(URL(url), no_proxy) is bypass


def test_credential_helpers_in_docker_config() -> None:
    config = parse_docker_config_file(
        json.dumps(
            {
                "auths": {"r.example": {"auth": ""}},
                "credHelpers": {"https://123.dkr.ecr.eu-west-1.amazonaws.com": "ecr-login"},
                "credsStore": "desktop",
            }
        )
    )
    assert config.cred_helpers == {"123.dkr.ecr.eu-west-1.amazonaws.com": "ecr-login"}
    assert config.creds_store == "desktop"
    bad_configs: list[dict[str, object]] = [
        {"credsStore": "../../bin/sh"},
        {"credHelpers": {"r": "a b"}},
        {"credHelpers": []},
    ]
    for bad in bad_configs:
        with pytest.raises(ConfigError, match="cred"):
            parse_docker_config_file(json.dumps(bad))


def test_unusable_environment_proxy_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.internal:3128")  # no scheme: http:// as curl does
    assert environment_proxies()["https"] == "http://proxy.internal:3128"
    monkeypatch.setenv("ALL_PROXY", "socks5://user:secret@proxy.internal:1080")
    with pytest.raises(ConfigError, match="ALL_PROXY") as info:
        environment_proxies()
    assert "secret" not in str(info.value)
