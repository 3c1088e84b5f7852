"""The Hugging Face token: hf.token_file, else HF_TOKEN, else huggingface_hub's token file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cacheagent.errors import ConfigError
from cacheagent.sources.hftoken import resolve_hf_token, standard_token_path


def token_at(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_configured_file_wins_over_everything(tmp_path: Path) -> None:
    configured = token_at(tmp_path / "configured", "hf_configured\n")
    token_at(tmp_path / "home" / "token", "hf_home")
    env = {"HF_TOKEN": "hf_env", "HF_HOME": str(tmp_path / "home")}
    assert resolve_hf_token(configured, env) == "hf_configured"


def test_hf_token_variable_comes_before_the_token_file(tmp_path: Path) -> None:
    token_at(tmp_path / "home" / "token", "hf_home")
    assert resolve_hf_token(None, {"HF_TOKEN": " hf_env ", "HF_HOME": str(tmp_path / "home")}) == (
        "hf_env"
    )


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({"HF_TOKEN_PATH": "{t}/explicit"}, "explicit"),
        ({"HF_HOME": "{t}/hfhome"}, "hfhome/token"),
        ({"XDG_CACHE_HOME": "{t}/xdg"}, "xdg/huggingface/token"),
        ({"HOME": "{t}/user"}, "user/.cache/huggingface/token"),
    ],
)
def test_the_token_file_is_where_huggingface_hub_keeps_it(
    tmp_path: Path, env: dict[str, str], where: str
) -> None:
    env = {k: v.format(t=tmp_path) for k, v in env.items()}
    assert standard_token_path(env) == tmp_path / where
    token_at(tmp_path / where, "hf_from_file\n")
    assert resolve_hf_token(None, env) == "hf_from_file"


def test_no_token_anywhere_means_anonymous(tmp_path: Path) -> None:
    assert resolve_hf_token(None, {"HOME": str(tmp_path)}) is None
    token_at(tmp_path / ".cache" / "huggingface" / "token", "  \n")
    assert resolve_hf_token(None, {"HOME": str(tmp_path), "HF_TOKEN": ""}) is None


def test_an_unreadable_standard_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = token_at(tmp_path / "hfhome" / "token", "hf_secret_value")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: make it a directory instead
            path.unlink()
            path.mkdir()
        with pytest.raises(ConfigError) as err:
            resolve_hf_token(None, {"HF_HOME": str(tmp_path / "hfhome")})
    finally:
        if path.is_dir():
            path.rmdir()
    assert err.value.key == "hf.token_file"
    assert str(path) in err.value.problem
    assert "hf_secret_value" not in str(err.value)


def test_a_configured_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hf\.token_file"):
        resolve_hf_token(tmp_path / "nope", {"HF_TOKEN": "hf_env"})
