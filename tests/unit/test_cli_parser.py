"""The command line's grammar: global options before or after the command, in order."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheagent.cli.agent_commands import evict_request
from cacheagent.cli.output import UsageError
from cacheagent.cli.parser import parse_args
from cacheagent.errors import ConfigError


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--config", "/etc/c.yaml", "ls"],
        ["ls", "--json", "--config", "/etc/c.yaml"],
        ["--config", "/etc/c.yaml", "ls", "--json"],
    ],
)
def test_global_options_are_accepted_before_or_after_the_command(argv: list[str]) -> None:
    args = parse_args(argv)
    assert args.command == "ls"
    assert args.json is True
    assert args.config == Path("/etc/c.yaml")


def test_set_flags_keep_command_line_order_across_the_command() -> None:
    args = parse_args(["--set", "a.b=1", "status", "--set", "a.b=2", "--set", "c.d=3"])
    assert args.set == ["a.b=1", "a.b=2", "c.d=3"]


def test_a_single_valued_option_is_taken_from_either_side() -> None:
    assert parse_args(["status", "--socket", "/after.sock"]).socket == Path("/after.sock")
    assert parse_args(["--socket", "/before.sock", "status"]).socket == Path("/before.sock")
    same = parse_args(["--socket", "/s.sock", "status", "--socket", "/s.sock"])
    assert same.socket == Path("/s.sock")


def test_different_values_on_both_sides_are_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_args(["--store-root", "/a", "ls", "--store-root", "/b"])


def test_no_global_option_given_leaves_defaults() -> None:
    args = parse_args(["status"])
    assert (args.config, args.socket, args.store_root, args.set, args.json) == (
        None,
        None,
        None,
        [],
        False,
    )


def test_every_command_takes_json() -> None:
    for argv in (
        ["config"],
        ["preheat", "r"],
        ["pull", "r"],
        ["ls"],
        ["stat", "m"],
        ["rm", "m"],
        ["pin", "m"],
        ["unpin", "m"],
        ["status"],
        ["gc"],
        ["evict", "--free", "1Gi"],
    ):
        assert parse_args([*argv, "--json"]).json, argv


def test_evict_targets_become_reclaim_requests() -> None:
    assert evict_request("80%", None, dry_run=True).to_capacity_fraction == pytest.approx(0.8)
    assert evict_request("400Gi", None, dry_run=False).to_used_bytes == 400 << 30
    request = evict_request(None, "50Gi", dry_run=False)
    assert request.WhichOneof("target") == "free_bytes" and request.free_bytes == 50 << 30


@pytest.mark.parametrize(
    ("to", "free", "flag"),
    [("120%", None, "--to"), ("lots", None, "--to"), ("x%", None, "--to"), (None, "-1", "--free")],
)
def test_bad_evict_targets_name_the_flag(to: str | None, free: str | None, flag: str) -> None:
    with pytest.raises(UsageError) as err:
        evict_request(to, free, dry_run=False)
    assert err.value.flag == flag
