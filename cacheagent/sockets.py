"""Claim a unix socket path for a server without taking it from a live one.

gRPC unlinks whatever socket file sits at the path it binds, so a second agent started by
mistake (another store, same socket path) would silently take the first one's socket. Before
binding, the path is probed: nothing there or a socket nobody answers on (left by a crash) is
fine, and the stale file is removed; a socket that accepts a connection, or anything that is
not a socket, is a ``ConfigError`` naming the setting. The agent API socket's group and mode
(``agent.socket_group``, ``agent.socket_mode``) are applied here too.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
from pathlib import Path

from cacheagent.errors import ConfigError

log = logging.getLogger(__name__)

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the terminating NUL
PROBE_TIMEOUT_SECONDS = 1.0


def prepare_socket(path: Path, key: str, *, dir_mode: int = 0o750, gid: int | None = None) -> None:
    """Create the socket's directory; remove a stale socket, refuse a live one or a non-socket.

    ``key`` is the config setting that named ``path`` (for the error). With ``gid``, a
    directory created here gets that group (an existing one is left as it is). Blocking: call
    it in a worker thread from the event loop.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(key, f"{path} is longer than {MAX_SOCKET_PATH} bytes")
    if gid is not None and not path.parent.exists():
        path.parent.mkdir(mode=dir_mode, parents=True)
        os.chown(path.parent, -1, gid)
    path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(key, f"{path} exists and is not a socket; refusing to replace it")
    if is_live(path):
        raise ConfigError(key, f"{path} is in use by another process (is an agent running?)")
    log.info("removing stale socket %s", path)
    path.unlink()


def is_live(path: Path, kind: socket.SocketKind = socket.SOCK_STREAM) -> bool:
    """Whether a process accepts connections on the unix socket at ``path`` (of type ``kind``:
    a probe of the wrong type is refused even by a live server)."""
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.settimeout(PROBE_TIMEOUT_SECONDS)
        probe.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def resolve_gid(group: str | None) -> int | None:
    """The GID of ``agent.socket_group`` (a name or a number); ConfigError if there is none."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError("agent.socket_group", f"no group {group!r} on this node") from None


def set_access(path: Path, mode: int, gid: int | None) -> None:
    """Give a bound socket its group (when set) and mode (agent.socket_group/socket_mode)."""
    if gid is not None:
        os.chown(path, -1, gid)
    path.chmod(mode)
