"""The FUSE mount across agent restarts: resume the connection the keeper holds, or mount anew.

Without a keeper (``fuse.keeper_socket`` unset) the mount lives and dies with the agent: start
mounts, stop unmounts, and lazy volumes end with the process. With one, the agent hands the
keeper a copy of its ``/dev/fuse`` descriptor once mounted, and on SIGTERM it only *detaches*
(stops reading requests, answers those in flight, leaves the mount): the kernel queues pod reads
until the next agent takes the descriptor back from the keeper and resumes serving. After a
SIGKILL the same happens, and the requests the dead agent had read but not answered are resent
by the kernel (``FUSE_NOTIFY_RESEND``). If no agent comes back within ``fuse.handover_seconds``
the keeper closes its copy, which aborts the connection: readers get an error, not a hang.

Blocking (sockets, mount(2), joins): the agent calls these through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from cacheagent.fuse.keeper_client import KeeperError, KeeperLink, KeeperRefusedError
from cacheagent.fuse.mount import FuseMount, MountError, SessionState

log = logging.getLogger(__name__)


@dataclass
class HandedOverMount:
    """A ``FuseMount`` whose connection a keeper holds between agents (``link`` None: no keeper)."""

    mount: FuseMount
    link: KeeperLink | None
    detach_timeout: float

    def open(self) -> None:
        """Resume the connection the keeper holds for this mount point, else mount anew."""
        if self.link is None or not self._resume(self.link):
            self.mount.start()
        if self.link is not None:
            self._hold(self.link)

    def close(self) -> None:
        """With a keeper: detach and leave the connection to it (the next agent resumes it).
        Without: unmount."""
        if self.link is None:
            self.mount.stop()
            return
        try:
            self.mount.detach(self.detach_timeout)
        finally:
            self.link.close()
        log.info(
            "fuse: detached from %s; the keeper holds the connection for the next agent",
            self.mount.mountpoint,
        )

    def _resume(self, link: KeeperLink) -> bool:
        """KeeperRefusedError (another live agent serves this mount point) propagates: two
        agents must never serve one mount, so this one does not start."""
        try:
            held = link.take()
        except KeeperRefusedError:
            raise
        except KeeperError as exc:
            log.warning("fuse: %s; mounting anew (lazy volumes of a previous agent are lost)", exc)
            return False
        if held is None:
            return False
        fd, state = held
        try:
            self.mount.resume(fd, SessionState.from_json(state))
        except (MountError, ValueError) as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            # The hold after the new mount replaces the keeper's copy, which ends that connection.
            log.warning("fuse: cannot resume the held connection (%s); mounting anew", exc)
            return False
        log.info("fuse: resumed the connection at %s from the keeper", self.mount.mountpoint)
        return True

    def _hold(self, link: KeeperLink) -> None:
        """Keeper failures are logged and retried by the link in the background."""
        link.hold(self.mount.device_fd, self.mount.state().to_json())
