"""``--config`` and ``--set`` work before and after the command (manifests put them after)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.cli.main import build_parser, load
from cacheagent.errors import ConfigError


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("store:\n  root: /from/file\npull:\n  retries: 7\n")
    return path


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_file_is_read_before_or_after_the_command(tmp_path: Path, where: str) -> None:
    path = str(_config(tmp_path))
    argv = ["--config", path, "serve"] if where == "before" else ["serve", "--config", path]
    config = load(build_parser().parse_args(argv))
    assert config.store.root == Path("/from/file")
    assert config.pull.retries == 7


def test_set_on_both_sides_of_the_command_are_all_applied(tmp_path: Path) -> None:
    argv = ["--set", "pull.retries=3", "serve", "-c", str(_config(tmp_path))]
    argv += ["--set", "store.root=/after"]
    config = load(build_parser().parse_args(argv))
    assert config.pull.retries == 3
    assert config.store.root == Path("/after")


def test_two_different_config_files_are_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--config", "/a.yaml", "serve", "--config", "/b.yaml"])
    with pytest.raises(ConfigError, match="given twice"):
        load(args)
