"""The read-only FUSE filesystem: ``<mount>/<manifest digest>/<file path>``.

Metadata (listings, sizes, modes) comes from each model's manifest through the provider, so a
model shows its whole tree before its bytes are on disk; reads go to the provider, which may
block while it fetches a missing range. Every write-type operation answers EROFS (the mount is
also ``ro``, so the kernel usually refuses first; these handlers are the second line). There are
no extended attributes: ``getxattr`` answers ENODATA and ``listxattr`` an empty list, so tools
that copy xattrs (cp -a, rsync -X, tar --xattrs) see plain files.

Callbacks run in libfuse's worker threads, several at once. mfusepy registers every attribute
whose name is a FUSE operation, so helpers here are private (``_name``) and nothing is called
``lock``, ``poll``, ``ioctl`` or the like.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from cacheagent.errors import UnsafePathError
from cacheagent.fuse.errmap import ErrorKind, classify
from cacheagent.fuse.libfuse import FuseOSError, Operations, context_fuse, invalidate_path
from cacheagent.fuse.provider import ContentProvider
from cacheagent.fuse.stats import FuseStats
from cacheagent.fuse.tree import (
    NAME_MAX,
    Directory,
    ModelTree,
    Node,
    dir_attrs,
    file_attrs,
    is_model_name,
    parse_mount_path,
)

log = logging.getLogger(__name__)

STATFS_BLOCK = 4096
DEFAULT_TREE_CACHE = 256


@dataclass(frozen=True)
class _Model:
    tree: ModelTree
    time_ns: int


class CacheFilesystem(Operations):  # type: ignore[misc]  # mfusepy ships no type information
    """mfusepy ``Operations`` over a ``ContentProvider``; counters go to ``stats``."""

    use_ns = True  # timestamps in integer nanoseconds (mfusepy's non-deprecated mode)

    def __init__(
        self,
        provider: ContentProvider,
        stats: FuseStats | None = None,
        *,
        tree_cache_size: int = DEFAULT_TREE_CACHE,
        on_init: Callable[[], None] | None = None,
        max_background: int | None = None,
    ) -> None:
        self.stats = stats if stats is not None else FuseStats()
        self._provider = provider
        self._on_init = on_init
        self._max_background = max_background
        self._session: int | None = None  # libfuse's struct fuse *, between init and destroy
        self._session_guard = threading.Lock()
        self._started_ns = time.time_ns()
        self._trees: OrderedDict[str, _Model] = OrderedDict()
        self._tree_cache_size = tree_cache_size
        self._trees_guard = threading.Lock()
        self._sizes: dict[int, int] = {}  # open handle -> file size

    # -- lifecycle and cache --------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        """libfuse has processed the kernel's INIT: the mount now answers requests.

        ``max_background`` caps the kernel's asynchronous requests (readahead) in flight; at the
        kernel's default of 12, readahead of reads waiting for a stalled origin fills it and
        readahead of cached files queues behind them.
        """
        if conn_info is not None and self._max_background is not None:
            conn_info.max_background = self._max_background
            conn_info.congestion_threshold = max(1, self._max_background * 3 // 4)
        with self._session_guard:
            self._session = context_fuse()
        if self._on_init is not None:
            self._on_init()

    def destroy(self, path: str) -> None:
        """libfuse is about to free its session: no invalidation may use it from now on."""
        with self._session_guard:
            self._session = None

    def invalidate(self, model: str, relpath: str) -> bool:
        """Drop the kernel's cached pages of one file, e.g. bytes served before their blob
        failed verification. Call it from outside FUSE callbacks (the kernel may wait for the
        pages of a request in flight). False when the kernel held nothing or FUSE is gone."""
        path = f"/{model}/{relpath}"
        with self._session_guard:
            if self._session is None:
                return False
            result = invalidate_path(self._session, path)
        if result not in (0, -errno.ENOENT):
            log.warning("fuse: invalidating %s failed: %s", path, os.strerror(-result))
        return result == 0

    def forget(self, digest: str) -> None:
        """Drop the cached tree of a model (call it when the model is evicted or replaced)."""
        with self._trees_guard:
            self._trees.pop(digest, None)

    @property
    def open_handles(self) -> int:
        return len(self._sizes)

    # -- metadata -------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        where = parse_mount_path(path)
        if where.model is None:
            return dir_attrs(len(self._model_names()), self._started_ns)
        model = self._model(where.model)
        node = self._node(model, where.relpath)
        if isinstance(node, Directory):
            return dir_attrs(node.subdirs, model.time_ns)
        return file_attrs(node, model.time_ns)

    def readdir(self, path: str, fh: int) -> list[str]:
        where = parse_mount_path(path)
        if where.model is None:
            return [".", "..", *self._model_names()]
        node = self._node(self._model(where.model), where.relpath)
        if not isinstance(node, Directory):
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", *node.children]

    def statfs(self, path: str) -> dict[str, int]:
        """Totals over the visible models (all as used space: nothing can be written here)."""
        total_bytes = 0
        inodes = 1
        for name in self._model_names():
            try:
                tree = self._model(name).tree
            except OSError:
                continue  # evicted meanwhile, or its listing failed (already counted)
            total_bytes += tree.total_bytes
            inodes += len(tree.nodes)
        return {
            "f_bsize": STATFS_BLOCK,
            "f_frsize": STATFS_BLOCK,
            "f_blocks": (total_bytes + STATFS_BLOCK - 1) // STATFS_BLOCK,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": inodes,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": NAME_MAX,
        }

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        raise FuseOSError(errno.ENODATA)

    def listxattr(self, path: str) -> list[str]:
        return []

    # -- data -----------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self._refuse()
        where = parse_mount_path(path)
        if where.model is None:
            raise FuseOSError(errno.EISDIR)
        node = self._node(self._model(where.model), where.relpath)
        if isinstance(node, Directory):
            raise FuseOSError(errno.EISDIR)
        try:
            handle = self._provider.open_file(where.model, where.relpath)
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc)
        self._sizes[handle] = node.size
        return handle

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        file_size = self._sizes.get(fh)
        if file_size is None:
            raise FuseOSError(errno.EBADF)
        want = min(size, file_size - offset)
        if want <= 0:
            return b""
        try:
            data = self._provider.read(fh, offset, want)
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc)
        if len(data) != want:
            log.error(
                "fuse: provider returned %d bytes for %d at %d of %s", len(data), want, offset, path
            )
            self.stats.record_error(ErrorKind.IO)
            raise FuseOSError(errno.EIO)
        self.stats.record_read(want)
        return data

    def release(self, path: str, fh: int) -> int:
        self._sizes.pop(fh, None)
        try:
            self._provider.release(fh)
        except Exception as exc:  # noqa: BLE001  # the file is closed either way; count and log
            self.stats.record_error(classify(exc).kind)
            log.warning("fuse: releasing %s failed: %s", path, exc)
        return 0

    # -- every write-type operation: EROFS ------------------------------------------------------

    def _refuse(self) -> NoReturn:
        self.stats.record_error(ErrorKind.READ_ONLY)
        raise FuseOSError(errno.EROFS)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._refuse()

    def create(self, path: str, mode: int, fi: object = None) -> int:
        self._refuse()

    def mkdir(self, path: str, mode: int) -> int:
        self._refuse()

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._refuse()

    def rmdir(self, path: str) -> int:
        self._refuse()

    def unlink(self, path: str) -> int:
        self._refuse()

    def rename(self, old: str, new: str) -> int:
        self._refuse()

    def link(self, target: str, source: str) -> int:
        self._refuse()

    def symlink(self, target: str, source: str) -> int:
        self._refuse()

    def chmod(self, path: str, mode: int) -> int:
        self._refuse()

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._refuse()

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._refuse()

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._refuse()

    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        self._refuse()

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._refuse()

    def removexattr(self, path: str, name: str) -> int:
        self._refuse()

    # -- helpers --------------------------------------------------------------------------------

    def _model_names(self) -> Sequence[str]:
        try:
            names = self._provider.models()
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc)
        return [name for name in names if is_model_name(name)]

    def _model(self, name: str) -> _Model:
        with self._trees_guard:
            cached = self._trees.get(name)
            if cached is not None:
                self._trees.move_to_end(name)
                return cached
        model = self._load_model(name)
        with self._trees_guard:
            self._trees[name] = model
            while len(self._trees) > self._tree_cache_size:
                self._trees.popitem(last=False)
        return model

    def _load_model(self, name: str) -> _Model:
        if not is_model_name(name):
            raise FuseOSError(errno.ENOENT)
        try:
            listing = self._provider.listing(name)
            tree = ModelTree.build(listing.files)
        except UnsafePathError as exc:
            log.error("fuse: model %s has an unusable file list: %s", name, exc)
            self.stats.record_error(ErrorKind.IO)
            raise FuseOSError(errno.EIO) from exc
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc, count_missing=False)
        return _Model(tree, int(listing.created * 1_000_000_000))

    @staticmethod
    def _node(model: _Model, relpath: str) -> Node:
        node = model.tree.lookup(relpath)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def _raise_for(self, exc: BaseException, *, count_missing: bool = True) -> NoReturn:
        """Count ``exc`` and raise the errno it maps to.

        A lookup of a name that does not exist (``count_missing=False``) is not an error worth a
        metric: shells and file managers probe names all the time.
        """
        failure = classify(exc)
        if failure.kind is ErrorKind.INTERNAL:
            log.error("fuse: unexpected provider failure", exc_info=exc)
        if count_missing or failure.kind is not ErrorKind.NOT_FOUND:
            self.stats.record_error(failure.kind)
        raise FuseOSError(failure.errno) from exc
