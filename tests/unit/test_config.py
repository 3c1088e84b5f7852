"""Configuration: layering, parsing of sizes and durations, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cacheagent.config import (
    Capacity,
    Config,
    CsiConfig,
    PullConfig,
    StoreConfig,
    load_config,
    parse_byte_size,
    parse_duration,
)
from cacheagent.errors import ConfigError

GiB = 1024**3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_the_documented_production_values() -> None:
    config = load_config(None, {}, {})
    assert config == Config()
    assert config.store.root == Path("/var/lib/cacheagent")
    assert config.store.capacity == Capacity(percent=90.0)
    assert (config.store.high_watermark, config.store.low_watermark) == (0.95, 0.85)
    assert config.store.tag_ttl_seconds == 300.0
    assert config.pull.range_threshold_bytes == 64 * 1024**2
    assert config.pull.range_chunk_bytes == 16 * 1024**2
    assert (config.pull.max_connections_per_origin, config.pull.max_connections_total) == (8, 32)
    assert config.pull.retries == 5
    assert config.pull.manifest_max_bytes == 4 * 1024**2
    assert config.agent.socket == Path("/run/cacheagent/agent.sock")
    assert config.agent.http_listen == "0.0.0.0:9464"
    assert config.csi.driver_name == "model.cacheagent.io"
    assert config.csi.kubelet_dir == Path("/var/lib/kubelet")
    assert config.csi.socket_path == Path("/var/lib/kubelet/plugins/model.cacheagent.io/csi.sock")
    assert config.fuse.mountpoint == Path("/run/cacheagent/fuse")
    assert config.fuse.read_ahead_kb == 8192
    assert config.prefetch.memory_share == 0.5
    assert config.hf.endpoint == "https://huggingface.co"
    assert config.policy.allowed_sources == ()
    assert dict(config.policy.namespaces) == {}


def test_section_names_match_the_config_fields() -> None:
    for spec in dataclasses.fields(Config):
        section = getattr(Config(), spec.name)
        assert type(section).section == spec.name


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pull:\n  retries: 2\n  timeout_seconds: 10s\nstore:\n  root: /file/root\n",
    )
    env = {"CACHEAGENT_PULL__RETRIES": "3", "CACHEAGENT_STORE__ROOT": "/env/root"}

    assert load_config(path, {}, {}).pull.retries == 2
    from_env = load_config(path, env, {})
    assert from_env.pull.retries == 3
    assert from_env.store.root == Path("/env/root")
    assert from_env.pull.timeout_seconds == 10.0  # untouched file value survives
    final = load_config(path, env, {"pull.retries": 4, "store.root": None})
    assert final.pull.retries == 4
    assert final.store.root == Path("/env/root")  # a None override is a flag not given


def test_environment_lists_mappings_and_unset(tmp_path: Path) -> None:
    path = write(tmp_path, "csi:\n  node_id: node-a\n")
    env = {
        "CACHEAGENT_REGISTRIES__INSECURE": "localhost:5000, registry.lan ,",
        "CACHEAGENT_REGISTRIES__MIRRORS": "{docker.io: [mirror.lan, mirror2.lan]}",
        "CACHEAGENT_POLICY__NAMESPACES": "{team-*: 'registry.lan/*,hf://*'}",
        "CACHEAGENT_CSI__NODE_ID": "",
        "CACHEAGENT_REQUIRE_SYSTEM_TESTS": "1",
        "CACHEAGENT_CONFIG": "/etc/other.yaml",
        "PATH": "/usr/bin",
    }
    config = load_config(path, env, {})
    assert config.registries.insecure == ("localhost:5000", "registry.lan")
    assert dict(config.registries.mirrors) == {"docker.io": ("mirror.lan", "mirror2.lan")}
    assert dict(config.policy.namespaces) == {"team-*": ("registry.lan/*", "hf://*")}
    assert config.csi.node_id is None


def test_yaml_types_sizes_and_durations(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
store:
  capacity: 500Gi
  tag_ttl_seconds: 5m
pull:
  range_threshold_bytes: 1.5GiB
  range_chunk_bytes: 1048576
registries:
  proxy: {"*": "http://127.0.0.1:3128/"}
agent:
  log_level: DEBUG
  http_listen: "[::]:9100"
""",
    )
    config = load_config(path, {}, {})
    assert config.store.capacity == Capacity(bytes=500 * GiB)
    assert config.store.tag_ttl_seconds == 300.0
    assert config.pull.range_threshold_bytes == 3 * GiB // 2
    assert config.pull.range_chunk_bytes == 1048576
    assert dict(config.registries.proxy) == {"*": "http://127.0.0.1:3128"}
    assert config.agent.log_level == "debug"
    assert config.agent.http_listen == "[::]:9100"


def test_csi_socket_follows_driver_and_kubelet_dir() -> None:
    config = load_config(None, {}, {"csi.driver_name": "x.example.org", "csi.kubelet_dir": "/k"})
    assert config.csi.socket_path == Path("/k/plugins/x.example.org/csi.sock")
    explicit = load_config(None, {}, {"csi.socket": "/run/csi.sock"})
    assert explicit.csi.socket_path == Path("/run/csi.sock")


BAD_VALUES: list[tuple[str, object, str, str]] = [
    (
        "store.capacity",
        "lots",
        "store.capacity",
        "expected a byte size like 500Gi or a percentage like 80%, got 'lots'",
    ),
    ("store.capacity", "0%", "store.capacity", "percentage must be in (0, 100]"),
    ("store.capacity", "150%", "store.capacity", "percentage must be in (0, 100]"),
    ("store.capacity", 0, "store.capacity", "must be positive"),
    ("store.root", "var/lib/x", "store.root", "expected an absolute path"),
    ("store.high_watermark", 1.5, "store.high_watermark", "expected a value in (0, 1]"),
    ("store.high_watermark", "high", "store.high_watermark", "expected a number"),
    (
        "store.low_watermark",
        0.96,
        "store.low_watermark",
        "must be below store.high_watermark (0.95)",
    ),
    ("store.tag_ttl_seconds", "soon", "store.tag_ttl_seconds", "expected a duration like 30s"),
    ("pull.retries", -1, "pull.retries", "expected a value in [0, 100], got -1"),
    ("pull.retries", "three", "pull.retries", "expected a whole number"),
    ("pull.retries", 2.5, "pull.retries", "expected a whole number"),
    ("pull.retries", True, "pull.retries", "expected a whole number"),
    ("pull.max_connections_total", 0, "pull.max_connections_total", "[1, 4096]"),
    ("pull.timeout_seconds", 0, "pull.timeout_seconds", "expected a value in (0, inf)"),
    ("pull.range_chunk_bytes", "16 furlongs", "pull.range_chunk_bytes", "expected a byte size"),
    ("pull.manifest_max_bytes", "0.5", "pull.manifest_max_bytes", "not a whole number of bytes"),
    ("agent.log_format", "xml", "agent.log_format", "expected one of text, json, got 'xml'"),
    ("agent.http_listen", "9464", "agent.http_listen", "expected host:port"),
    ("agent.http_listen", "0.0.0.0:99999", "agent.http_listen", "port 99999 out of range"),
    ("hf.endpoint", "ftp://hub", "hf.endpoint", "expected an http:// or https:// URL"),
    ("csi.driver_name", "-bad-", "csi.driver_name", "expected a CSI driver name"),
    ("csi.node_id", 12, "csi.node_id", "expected text, got int 12"),
    ("fuse.read_ahead_kb", -1, "fuse.read_ahead_kb", "[0, 1048576]"),
    ("prefetch.memory_share", 0, "prefetch.memory_share", "(0, 1]"),
    ("registries.insecure", [1], "registries.insecure[0]", "expected text"),
    ("registries.insecure", {"a": 1}, "registries.insecure", "expected a list"),
    ("registries.mirrors", {"docker.io": [3]}, "registries.mirrors.docker.io[0]", "expected text"),
    ("registries.mirrors", "[a, b]", "registries.mirrors", "expected a mapping"),
    ("registries.proxy", {"*": "socks://x"}, "registries.proxy.*", "http:// or https://"),
    ("policy.namespaces", {1: ["x"]}, "policy.namespaces", "expected text keys"),
    ("store.rooot", "/x", "store.rooot", "unknown key; store has: root, capacity"),
    ("stor.root", "/x", "stor.root", "unknown section 'stor'"),
    ("store", "/x", "store", "unknown key"),
]


@pytest.mark.parametrize(("key", "value", "bad_key", "fragment"), BAD_VALUES)
def test_bad_override_names_key_and_expectation(
    key: str, value: object, bad_key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {}, {key: value})
    assert caught.value.key == bad_key
    assert fragment in caught.value.problem
    assert bad_key in str(caught.value)


def test_comma_list_in_a_mapping_value_is_accepted() -> None:
    config = load_config(None, {}, {"registries.mirrors": {"docker.io": "m1, m2,"}})
    assert dict(config.registries.mirrors) == {"docker.io": ("m1", "m2")}


def test_error_says_which_layer_set_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, "pull:\n  retries: many\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(path, {}, {})
    assert from_file.value.key == "pull.retries"
    assert f"from file {path}" in from_file.value.problem

    env = {"CACHEAGENT_STORE__CAPACITY": "lots"}
    with pytest.raises(ConfigError) as from_env:
        load_config(None, env, {})
    assert "from environment variable CACHEAGENT_STORE__CAPACITY" in from_env.value.problem

    with pytest.raises(ConfigError) as unknown_env:
        load_config(None, {"CACHEAGENT_PULL__RETRYS": "3"}, {})
    assert unknown_env.value.key == "pull.retrys"
    assert "CACHEAGENT_PULL__RETRYS" in unknown_env.value.problem

    with pytest.raises(ConfigError) as nested:
        load_config(None, {"CACHEAGENT_REGISTRIES__MIRRORS": "{a: [1]}"}, {})
    assert nested.value.key == "registries.mirrors.a[0]"
    assert "CACHEAGENT_REGISTRIES__MIRRORS" in nested.value.problem


def test_malformed_environment_name_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"CACHEAGENT_STORE__ROOT__X": "/x"}, {})
    assert "CACHEAGENT_<SECTION>__<KEY>" in caught.value.problem


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("store: [1, 2]\n", "store", "expected a mapping of settings, got list"),
        ("- store\n", "{path}", "expected a mapping of sections, got list"),
        ("store: {root: /x\n", "{path}", "not valid YAML"),
        ("nosuch:\n  a: 1\n", "nosuch", "unknown section 'nosuch'"),
        ("store:\n  capacity: 10%\n  colour: blue\n", "store.colour", "unknown key"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {}, {})
    assert caught.value.key == key.format(path=path)
    assert fragment in caught.value.problem


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), {}, {}) == Config()
    assert load_config(write(tmp_path, "store:\npull:\n"), {}, {}) == Config()


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing, {}, {})
    assert caught.value.key == str(missing)
    assert "cannot read" in caught.value.problem


def test_sections_check_bounds_when_built_directly() -> None:
    with pytest.raises(ConfigError) as retries:
        PullConfig(retries=-1)
    assert retries.value.key == "pull.retries"
    with pytest.raises(ConfigError) as marks:
        StoreConfig(high_watermark=0.8, low_watermark=0.8)
    assert marks.value.key == "store.low_watermark"
    assert CsiConfig(node_id="n1").node_id == "n1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        (4096, 4096),
        (0, 0),
        (1e3, 1000),
        ("0", 0),
        ("500Gi", 500 * 1024**3),
        ("500GiB", 500 * 1024**3),
        ("10G", 10 * 10**9),
        ("10GB", 10 * 10**9),
        ("10g", 10 * 10**9),
        ("1.5TiB", 3 * 2**39),
        ("64Mi", 64 * 2**20),
        ("64 MiB", 64 * 2**20),
        ("1k", 1000),
        ("1Ki", 1024),
        ("2P", 2 * 10**15),
        ("1Ei", 2**60),
        ("0.5Ki", 512),
        ("12B", 12),
        (" 7 ", 7),
    ],
)
def test_byte_sizes(text: object, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("lots", "expected a byte size"),
        ("-1", "expected a byte size"),
        (-1, "expected a byte size"),
        ("10Q", "expected a byte size"),
        ("10 G i", "expected a byte size"),
        ("", "expected a byte size"),
        ("1.5", "not a whole number of bytes"),
        (0.5, "not a whole number of bytes"),
        (True, "expected a byte size"),
        (None, "expected a byte size"),
        (float("inf"), "expected a byte size"),
    ],
)
def test_bad_byte_sizes(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_byte_size(value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("0.25", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (" 10S ", 10.0),
    ],
)
def test_durations(value: object, expected: float) -> None:
    assert parse_duration(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "-5s", "5x", "m5", "", -1, True, None])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like 30s, 5m, 1h"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "capacity", "fs_total", "resolved"),
    [
        ("80%", Capacity(percent=80.0), 1000, 800),
        ("12.5%", Capacity(percent=12.5), 1000, 125),
        ("100%", Capacity(percent=100.0), 999, 999),
        ("90%", Capacity(percent=90.0), 3, 2),
        ("500Gi", Capacity(bytes=500 * GiB), 10**15, 500 * GiB),
        (1048576, Capacity(bytes=1048576), 10, 1048576),
        ("1T", Capacity(bytes=10**12), 0, 10**12),
    ],
)
def test_capacity_parse_and_resolve(
    value: object, capacity: Capacity, fs_total: int, resolved: int
) -> None:
    parsed = Capacity.parse(value)
    assert parsed == capacity
    assert parsed.resolve(fs_total) == resolved
    assert Capacity.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({}, "exactly one"),
        ({"bytes": 1, "percent": 50.0}, "exactly one"),
        ({"bytes": -5}, "must be positive"),
        ({"percent": 101.0}, "(0, 100]"),
    ],
)
def test_capacity_rejects_inconsistent_values(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        Capacity(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("Yes", True), ("0", False)])
def test_booleans_from_the_environment(text: str, expected: bool) -> None:
    config = load_config(None, {"CACHEAGENT_FUSE__ENABLED": text}, {})
    assert config.fuse.enabled is expected


def test_a_bad_boolean_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"fuse\.enabled: expected true or false, got 'maybe'"):
        load_config(None, {"CACHEAGENT_FUSE__ENABLED": "maybe"}, {})
