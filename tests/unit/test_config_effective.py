"""The configuration package: each setting's origin, the effective config as a file, new keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cacheagent.config import (
    Config,
    PrefetchConfig,
    PullConfig,
    effective_json,
    effective_yaml,
    load_config,
    load_layered,
    parse_socket_mode,
)
from cacheagent.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_each_setting_says_where_it_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "store:\n  root: /srv/cache\npull:\n  retries: 2\n")
    layered = load_layered(
        path,
        {"CACHEAGENT_PULL__RETRIES": "3", "CACHEAGENT_AGENT__LOG_LEVEL": "debug"},
        {"agent.log_level": "error"},
        labels={"agent.log_level": "--set agent.log_level=error"},
    )
    assert layered.origin("store.root").kind == "file"
    assert layered.origin("pull.retries").kind == "environment"
    assert str(layered.origin("pull.retries")) == "environment variable CACHEAGENT_PULL__RETRIES"
    assert layered.origin("agent.log_level").kind == "flag"
    assert layered.origin("store.capacity").kind == "default"
    report = effective_json(layered)
    assert report["config"]["pull"]["retries"] == 3
    assert report["config"]["agent"]["log_level"] == "error"
    assert report["sources"]["store.root"] == "file"
    assert report["details"]["agent.log_level"] == "--set agent.log_level=error"
    text = effective_yaml(layered)
    assert f"  root: /srv/cache  # file {path}\n" in text
    assert "  log_level: error  # --set agent.log_level=error\n" in text
    assert "  capacity: 90%  # default\n" in text


def test_the_effective_yaml_is_a_config_file_that_loads_the_same_config(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store: {root: /srv/c, capacity: 500Gi}\n"
        "registries: {insecure: [r.local:5000], mirrors: {docker.io: [m.local]}}\n"
        "agent: {socket_mode: 0600, socket_group: ops}\n"
        "pull: {max_blob_bytes: 2Ti, hash_mode: final}\n"
        "policy: {namespaces: {ml: ['r.local:5000/*']}, pod_layout_roots: [/srv/models],\n"
        "         http_allowed_networks: [127.0.0.0/8], lazy_sources: [oci, hf]}\n",
    )
    layered = load_layered(path, {}, {})
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(effective_yaml(layered))
    assert load_config(dumped, {}, {}) == layered.config
    as_json = tmp_path / "json.yaml"
    as_json.write_text(yaml.safe_dump(effective_json(layered)["config"]))
    assert load_config(as_json, {}, {}) == layered.config


def test_new_engine_keys_load_and_are_bounded(tmp_path: Path) -> None:
    config = load_config(
        None,
        {},
        {
            "pull.max_blob_bytes": "1Ti",
            "pull.hash_mode": "final",
            "pull.ranges_per_blob": "16",
            "pull.max_unpack_ratio": "100",
            "prefetch.workers": "4",
            "prefetch.method": "read",
        },
    )
    assert config.pull.max_blob_bytes == 1 << 40
    assert (config.pull.hash_mode, config.pull.ranges_per_blob) == ("final", 16)
    assert config.pull.max_unpack_ratio == 100.0
    assert (config.prefetch.workers, config.prefetch.method) == (4, "read")
    assert Config().pull.max_blob_bytes is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("pull.max_blob_bytes", "0", "[1, inf)"),
        ("pull.hash_mode", "md5", "running, final"),
        ("pull.ranges_per_blob", "0", "[1, 64]"),
        ("pull.ranges_per_blob", "65", "[1, 64]"),
        ("pull.max_unpack_ratio", "0.5", "[1, 10000]"),
        ("prefetch.workers", "0", "[1, 64]"),
        ("prefetch.method", "mmap", "fadvise, read"),
        ("csi.publish_wait_seconds", "2m", "[0, 120)"),
        ("csi.publish_wait_seconds", "-1", "duration"),
        ("agent.socket_mode", "0666", "others must get no access"),
        ("agent.socket_mode", "0460", "owner"),
        ("agent.socket_mode", "rw", "octal mode"),
        ("agent.socket_group", "bad group", "group name"),
    ],
)
def test_bad_values_of_new_keys_name_the_key(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {}, {key: value})
    assert err.value.key == key
    assert expected in err.value.problem


def test_publish_wait_is_checked_when_built_directly_too() -> None:
    from cacheagent.config import CsiConfig

    with pytest.raises(ConfigError, match=r"csi.publish_wait_seconds"):
        CsiConfig(publish_wait_seconds=120.0)
    with pytest.raises(ConfigError, match=r"pull.ranges_per_blob"):
        PullConfig(ranges_per_blob=0)
    assert dataclasses.replace(PrefetchConfig(), workers=64).workers == 64
    from cacheagent.config import AgentConfig

    with pytest.raises(ConfigError, match=r"agent\.socket_mode"):
        AgentConfig(socket_mode=0o666)


@pytest.mark.parametrize(
    ("raw", "mode"), [(0o660, 0o660), ("0600", 0o600), ("660", 0o660), ("0o640", 0o640)]
)
def test_socket_modes_are_octal(raw: object, mode: int) -> None:
    assert parse_socket_mode(raw) == mode


def test_yaml_reads_an_unquoted_mode_as_octal(tmp_path: Path) -> None:
    path = write(tmp_path, "agent:\n  socket_mode: 0640\n  socket_group: 4242\n")
    config = load_config(path, {}, {})
    assert config.agent.socket_mode == 0o640
    assert config.agent.socket_group == "4242"


def test_config_package_keeps_every_module_under_500_lines() -> None:
    import cacheagent.config as package

    for module in Path(package.__file__).parent.glob("*.py"):
        assert len(module.read_text().splitlines()) <= 500, module.name


def test_the_engine_gets_the_configured_knobs() -> None:
    from cacheagent.pull.tuning import tuning_from_config

    pull = load_config(
        None,
        {},
        {
            "pull.max_blob_bytes": "3Gi",
            "pull.hash_mode": "final",
            "pull.ranges_per_blob": "3",
            "pull.max_unpack_ratio": "7",
        },
    ).pull
    tuning = tuning_from_config(pull, tag_ttl_seconds=12.0)
    assert (tuning.max_blob_bytes, tuning.hash_mode) == (3 << 30, "final")
    assert (tuning.ranges_per_blob, tuning.max_unpack_ratio) == (3, 7.0)
    assert tuning.tag_ttl_seconds == 12.0
