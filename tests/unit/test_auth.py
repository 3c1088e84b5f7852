"""Docker config.json credentials, host normalisation and WWW-Authenticate parsing."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from cacheagent.errors import ConfigError
from cacheagent.sources.auth import Challenge, parse_www_authenticate
from cacheagent.sources.credentials import (
    Credentials,
    CredentialStore,
    RegistryAuthError,
    load_docker_config,
    normalize_registry_host,
    parse_docker_config,
)

SECRET = "s3cr3t-Pa55:with:colons"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("https://Registry.Example.com:5000/v2/", "registry.example.com:5000"),
        ("http://10.0.0.1:5000", "10.0.0.1:5000"),
        ("ghcr.io", "ghcr.io"),
        ("  quay.io/some/path ", "quay.io"),
    ],
)
def test_normalize_registry_host(key: str, host: str) -> None:
    assert normalize_registry_host(key) == host


def test_docker_config_entries() -> None:
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": _b64(f"hubuser:{SECRET}")},
            "registry.example.com:5000": {"username": "alice", "password": SECRET},
            "https://id.example.com/v2/": {"identitytoken": "refresh-" + SECRET},
            "empty.example.com": {},
        },
        "credsStore": "desktop",
    }
    creds = parse_docker_config(json.dumps(doc))
    assert set(creds) == {"docker.io", "registry.example.com:5000", "id.example.com"}
    assert creds["docker.io"] == Credentials("hubuser", SECRET)
    assert creds["registry.example.com:5000"] == Credentials("alice", SECRET)
    assert creds["id.example.com"].identity_token == "refresh-" + SECRET
    assert creds["docker.io"].basic_header() == "Basic " + _b64(f"hubuser:{SECRET}")


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"auth": "!!!not base64!!!"}, "auths.r.example.auth"),
        ({"auth": _b64("nocolonsecret")}, "auths.r.example.auth"),
        ({"username": 5}, "auths.r.example.username"),
        ("a string", "auths.r.example"),
    ],
)
def test_bad_entries_name_the_key_and_hide_the_secret(entry: object, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_docker_config(json.dumps({"auths": {"r.example": entry}}), source="cfg.json")
    assert where in str(info.value)
    assert SECRET not in str(info.value)
    assert "nocolonsecret" not in str(info.value)
    assert _b64("nocolonsecret") not in str(info.value)


def test_unparseable_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_docker_config(b'{"auths": {"r": {"password": "' + SECRET.encode())
    with pytest.raises(ConfigError, match="auths"):
        parse_docker_config(json.dumps({"auths": []}))


def test_missing_config_file_is_a_warning_and_no_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The DaemonSet mounts an optional Secret: when it does not exist the file is absent.
    with caplog.at_level(logging.WARNING):
        assert load_docker_config(tmp_path / "nope.json") == {}
    assert "registries.docker_config" in caplog.text
    assert "nope.json" in caplog.text


def test_unreadable_config_file_names_the_setting(tmp_path: Path) -> None:
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ConfigError, match=r"registries\.docker_config"):
        load_docker_config(tmp_path / "dir.json")


def test_credential_store_lookup_order(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "r.example": {"username": "from-file", "password": "p1"},
                    "r.example:5000": {"username": "port-specific", "password": "p2"},
                    "other.example": {"username": "file-other", "password": "p3"},
                }
            }
        )
    )
    store = CredentialStore(
        {"https://other.example/v1/": Credentials("explicit", "p4")}, docker_config=config
    )
    assert store.get("r.example:5000") == Credentials("port-specific", "p2")
    assert store.get("r.example:6000") == Credentials("from-file", "p1")  # host key: any port
    assert store.get("R.Example") == Credentials("from-file", "p1")
    assert store.get("other.example") == Credentials("explicit", "p4")  # explicit wins
    assert store.get("unknown.example") is None
    assert "p1" not in repr(store)


def test_secrets_never_in_reprs() -> None:
    creds = Credentials("bob", SECRET, identity_token="tok-" + SECRET)
    assert SECRET not in repr(creds)
    assert SECRET not in str(creds)
    assert "bob" in repr(creds)
    error = RegistryAuthError("r.example", "credentials for user 'bob' rejected (401)")
    assert "r.example" in str(error)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
            'scope="repository:models/x:pull,push"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.example.com/token",
                        "service": "registry.example.com",
                        "scope": "repository:models/x:pull,push",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        ("basic realm=simple", [Challenge("basic", {"realm": "simple"})]),
        (
            'Basic realm="a", Bearer realm="https://t/x", service=svc',
            [
                Challenge("basic", {"realm": "a"}),
                Challenge("bearer", {"realm": "https://t/x", "service": "svc"}),
            ],
        ),
        ('Bearer realm="quote \\" inside"', [Challenge("bearer", {"realm": 'quote " inside'})]),
        ("Bearer", [Challenge("bearer", {})]),
        ("", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate(header) == expected
