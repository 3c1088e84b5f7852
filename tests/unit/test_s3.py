"""The S3 source's pure parts: config validation, checksum headers, listing safety, URLs."""

from __future__ import annotations

import base64
import hashlib

import pytest

from cacheagent.config import load_config
from cacheagent.errors import ConfigError, SourceError
from cacheagent.sources.s3 import S3Options, S3Source, _parse_xml, _sha256_checksum


def test_s3_config_keys_are_validated_with_their_dotted_names() -> None:
    config = load_config(None, {"CACHEAGENT_S3__ENDPOINT": "http://127.0.0.1:9000"}, {})
    assert (config.s3.endpoint, config.s3.region, config.s3.addressing) == (
        "http://127.0.0.1:9000",
        "us-east-1",
        "auto",
    )
    with pytest.raises(ConfigError, match=r"s3\.addressing"):
        load_config(None, {"CACHEAGENT_S3__ADDRESSING": "sideways"}, {})
    with pytest.raises(ConfigError, match=r"s3\.access_key_id.*secret_access_key_file"):
        load_config(None, {"CACHEAGENT_S3__ACCESS_KEY_ID": "AKID"}, {})
    with pytest.raises(ConfigError, match=r"s3\.endpoint"):
        load_config(None, {"CACHEAGENT_S3__ENDPOINT": "ftp://x"}, {})


def test_only_a_full_object_sha256_checksum_is_a_digest() -> None:
    raw = hashlib.sha256(b"x").digest()
    assert _sha256_checksum(base64.b64encode(raw).decode()) == f"sha256:{raw.hex()}"
    assert _sha256_checksum(base64.b64encode(raw).decode() + "-3") is None  # multipart
    assert _sha256_checksum(None) is None
    assert _sha256_checksum("not base64!") is None
    assert _sha256_checksum(base64.b64encode(b"short").decode()) is None


def test_listing_with_a_dtd_is_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]><l>&a;</l>'
    with pytest.raises(SourceError, match="DTD"):
        _parse_xml(bomb)
    with pytest.raises(SourceError, match="not valid XML"):
        _parse_xml(b"<ListBucketResult>")


def test_urls_path_and_virtual_style() -> None:
    path = S3Source(options=S3Options(endpoint="http://minio:9000"))
    assert str(path._url("b", "m/a b.bin", {"versionId": "v+1"})) == (
        "http://minio:9000/b/m/a%20b.bin?versionId=v%2B1"
    )
    aws = S3Source(options=S3Options(region="eu-west-1"))
    assert str(aws._url("b", "k", {})) == "https://b.s3.eu-west-1.amazonaws.com/k"
