"""``fuse.keeper_socket`` and ``fuse.handover_seconds``, and the ``fuse-keeper`` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.cli import keeper_command
from cacheagent.cli.parser import parse_args
from cacheagent.config import load_config
from cacheagent.errors import ConfigError


def test_no_keeper_by_default_and_a_two_minute_window() -> None:
    fuse = load_config(None, {}, {}).fuse
    assert (fuse.keeper_socket, fuse.handover_seconds) == (None, 120.0)


def test_keeper_settings_load_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("fuse:\n  keeper_socket: /run/cacheagent/keeper/keeper.sock\n"
                    "  handover_seconds: 5m\n")  # fmt: skip
    fuse = load_config(path, {}, {}).fuse
    assert fuse.keeper_socket == Path("/run/cacheagent/keeper/keeper.sock")
    assert fuse.handover_seconds == 300.0


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("fuse.handover_seconds", "0", "expected a value in (0, 3600], got 0.0"),
        ("fuse.handover_seconds", "2h", "expected a value in (0, 3600], got 7200.0"),
        ("fuse.handover_seconds", "soon", "fuse.handover_seconds"),
        ("fuse.keeper_socket", "keeper.sock", "expected an absolute path"),
        ("fuse.keeper_socket", "/" + "k" * 120, "a unix socket path is at most 107 bytes"),
    ],
)
def test_bad_keeper_settings_name_the_key(key: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {}, {key: value})
    assert err.value.key == key and problem in str(err.value)


def test_the_command_line_knows_fuse_keeper_both_ways() -> None:
    args = parse_args(["--socket", "/run/k.sock", "fuse-keeper", "--log-format", "json"])
    assert (args.command, args.socket, args.log_format, args.log_level) == (
        "fuse-keeper",
        Path("/run/k.sock"),
        "json",
        "info",
    )
    own = keeper_command.parse(["--socket", "/run/k.sock", "--log-level", "debug"])
    assert (own.socket, own.log_format, own.log_level) == (Path("/run/k.sock"), "text", "debug")


def test_fuse_keeper_without_a_socket_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        keeper_command.parse([])
    assert exited.value.code == 2 and "--socket" in capsys.readouterr().err
    assert keeper_command.run(None, log_format="text", log_level="info") == 2
