"""Where the Hugging Face token comes from: ``hf.token_file``, else the places huggingface_hub uses.

With ``hf.token_file`` unset, the agent looks where ``huggingface-cli login`` and the
huggingface_hub library do, in their order: ``HF_TOKEN``, then the token file at
``HF_TOKEN_PATH``, else ``$HF_HOME/token`` (``HF_HOME`` defaults to
``$XDG_CACHE_HOME/huggingface``, and that to ``~/.cache/huggingface``). A missing or empty
standard file means "no token" (anonymous access); a configured file that is missing, or a
standard file that exists but cannot be read, is an error naming the file, never the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cacheagent.errors import ConfigError
from cacheagent.sources.hf import read_token_file


def resolve_hf_token(token_file: Path | None, env: Mapping[str, str]) -> str | None:
    """The token to send to the Hub endpoint, or None for anonymous access."""
    if token_file is not None:
        return read_token_file(token_file)
    from_env = env.get("HF_TOKEN", "").strip()
    if from_env:
        return from_env
    return _read_optional(standard_token_path(env))


def standard_token_path(env: Mapping[str, str]) -> Path:
    """huggingface_hub's token file for this environment."""
    if env.get("HF_TOKEN_PATH"):
        return Path(env["HF_TOKEN_PATH"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "token"
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else _home(env) / ".cache"
    return cache / "huggingface" / "token"


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _read_optional(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            "hf.token_file",
            f"unset, and the Hugging Face token file {path} cannot be read: {exc.strerror}",
        ) from None
    return token or None
