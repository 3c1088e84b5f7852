"""Transport policy: which URLs may be used, which proxy applies, what a logged URL shows."""

from __future__ import annotations

from pathlib import Path

import pytest
from yarl import URL

from cacheagent.errors import ConfigError, SourceError
from cacheagent.sources.transport import (
    Transport,
    TransportOptions,
    host_port,
    redact_url,
)

TRANSPORT = Transport(
    TransportOptions(
        insecure=frozenset({"plain.example", "Mixed.Example:5000"}),
        proxies={
            "r.example:5000": "http://exact-proxy:3128",
            "r.example": "http://host-proxy:3128",
            "*": "http://default-proxy:3128",
        },
    )
)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://anything.example/x", True),
        ("http://plain.example/x", True),
        ("http://plain.example:8080/x", True),  # a bare host entry covers every port
        ("http://mixed.example:5000/x", True),
        ("http://mixed.example:5001/x", False),  # a host:port entry covers only that port
        ("http://secure.example/x", False),
        ("ftp://plain.example/x", False),
    ],
)
def test_check_url(url: str, allowed: bool) -> None:
    if allowed:
        TRANSPORT.check_url(URL(url))
    else:
        with pytest.raises(SourceError) as info:
            TRANSPORT.check_url(URL(url), what="model URL")
        assert "model URL" in str(info.value)


def test_plain_http_error_says_what_to_configure() -> None:
    with pytest.raises(SourceError, match=r"secure\.example is not listed in registries\.insecure"):
        TRANSPORT.check_url(URL("http://secure.example/x"))


@pytest.mark.parametrize(
    ("origin", "scheme"),
    [("plain.example", "http"), ("plain.example:81", "http"), ("other.example", "https")],
)
def test_scheme_for_registry_hosts(origin: str, scheme: str) -> None:
    assert TRANSPORT.scheme_for(origin) == scheme


@pytest.mark.parametrize(
    ("url", "proxy"),
    [
        ("https://r.example:5000/v2/", "http://exact-proxy:3128"),
        ("https://r.example/v2/", "http://host-proxy:3128"),
        ("https://r.example:6000/v2/", "http://host-proxy:3128"),
        ("https://elsewhere.example/", "http://default-proxy:3128"),
    ],
)
def test_proxy_lookup(url: str, proxy: str) -> None:
    assert TRANSPORT.proxy_for(URL(url)) == proxy


def test_no_proxy_by_default() -> None:
    assert Transport().proxy_for(URL("https://r.example/")) is None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@host.example/path?X-Amz-Signature=abc", "https://host.example/path?..."),
        ("http://proxy.example:3128/", "http://proxy.example:3128/"),
        ("https://h.example/a#frag", "https://h.example/a"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://Registry.Example.com/v2/", "registry.example.com"),
        ("https://r.example:443/v2/", "r.example:443"),
        ("http://127.0.0.1:5000/", "127.0.0.1:5000"),
    ],
)
def test_host_port(url: str, origin: str) -> None:
    assert host_port(URL(url)) == origin


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"registries\.ca_file"):
        Transport(TransportOptions(ca_file=bad))
    with pytest.raises(ConfigError, match="cannot load"):
        Transport(TransportOptions(ca_file=tmp_path / "missing.pem"))
