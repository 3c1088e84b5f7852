"""The read-only filesystem over the model cache: ``<mount>/<manifest digest>/<file path>``.

Metadata (listings, sizes, modes) comes from each model's manifest through the provider, so a
model shows its whole tree before its bytes are on disk; reads go to the provider, which may
block while it fetches a missing range. Every write-type operation answers EROFS (the mount is
also ``ro``, so the kernel usually refuses first; ``refuse`` is the second line). There are no
extended attributes (the dispatcher answers ENODATA and an empty list).

Everything is addressed by node id (see ``nodes``), and a node id means the same in every
process, so after a hand-over this process answers for nodes and file handles the previous
agent issued: an unknown node id makes it load every model's tree once, and a READ on a handle
it never issued *adopts* that handle (opens the file for the node and keeps it under that
handle). Methods are called from the session's worker threads, several at once.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from cacheagent.errors import UnsafePathError
from cacheagent.fuse.errmap import ErrorKind, classify
from cacheagent.fuse.nodes import NodeClashError, NodeRef, NodeTable, node_id
from cacheagent.fuse.protocol import DT_DIR, DT_REG, ROOT_ID, Attr, Dirent, StatFs
from cacheagent.fuse.protocol import encode_inval_inode as _encode_inval_inode
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
)

log = logging.getLogger(__name__)

STATFS_BLOCK = 4096
DEFAULT_TREE_CACHE = 256
MODEL_TTL_S = 86400.0  # entries and attributes inside a model: content-addressed, immutable
ROOT_TTL_S = 1.0  # the root's attributes and its entries: models come and go
REBUILD_INTERVAL_S = 1.0  # by default, at most one load of every model a second

Notifier = Callable[[list[bytes]], None]


class FuseError(OSError):
    """The errno a FUSE request is answered with."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))


@dataclass(frozen=True)
class Entry:
    """A LOOKUP answer: the node, its attributes and how long the kernel may keep each."""

    nodeid: int
    attr: Attr
    entry_ttl: float
    attr_ttl: float


@dataclass(frozen=True)
class _Model:
    tree: ModelTree
    time_ns: int


@dataclass(frozen=True)
class _Open:
    handle: int  # the provider's
    size: int


class CacheFilesystem:
    """Node-id based operations over a ``ContentProvider``; counters go to ``stats``."""

    def __init__(
        self,
        provider: ContentProvider,
        stats: FuseStats | None = None,
        *,
        tree_cache_size: int = DEFAULT_TREE_CACHE,
        rebuild_interval_s: float = REBUILD_INTERVAL_S,
    ) -> None:
        self.stats = stats if stats is not None else FuseStats()
        self.nodes = NodeTable()
        self.notifier: Notifier | None = None  # set by the session serving the mount
        self._provider = provider
        self._started_ns = time.time_ns()
        self._trees: OrderedDict[str, _Model] = OrderedDict()
        self._tree_cache_size = tree_cache_size
        self._trees_guard = threading.Lock()
        self._open: dict[int, _Open] = {}  # our file handle (fh) -> provider handle
        self._open_guard = threading.Lock()
        self._adopt_guard = threading.Lock()
        self._rebuild_guard = threading.Lock()
        self._rebuilds = 0
        self._rebuild_interval_s = rebuild_interval_s
        self._last_rebuild = -rebuild_interval_s

    # -- cache and invalidation -----------------------------------------------------------------

    def invalidate(self, model: str, relpath: str) -> bool:
        """Drop the kernel's cached pages of one file, e.g. bytes served before their blob
        failed verification. Never call it from a request handler: the kernel may wait for the
        pages of a request in flight. False when the kernel held nothing or no session runs."""
        notifier = self.notifier
        if notifier is None:
            return False
        try:
            notifier(_encode_inval_inode(node_id(model, relpath)))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds no such inode
                log.warning("fuse: invalidating %s/%s failed: %s", model, relpath, exc)
            return False
        return True

    def forget(self, digest: str) -> None:
        """Drop the cached tree and node ids of a model (call it when it is evicted)."""
        with self._trees_guard:
            self._trees.pop(digest, None)
        self.nodes.drop_model(digest)

    @property
    def open_handles(self) -> int:
        with self._open_guard:
            return len(self._open)

    def release_all(self) -> None:
        """Close every provider handle (a detached session's files now belong to the next)."""
        with self._open_guard:
            handles = list(self._open)
        for fh in handles:
            self.release(fh)

    # -- metadata -------------------------------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Entry:
        if parent == ROOT_ID:
            model = self._model(name)
            nodeid = self._id(name, "")
            attr = self._attr(nodeid, model, "")
            return Entry(nodeid, attr, entry_ttl=ROOT_TTL_S, attr_ttl=MODEL_TTL_S)
        ref = self._ref(parent)
        model = self._model(ref.model)
        if not isinstance(self._node(model, ref.relpath), Directory):
            raise FuseError(errno.ENOTDIR)
        relpath = f"{ref.relpath}/{name}" if ref.relpath else name
        self._node(model, relpath)  # ENOENT before an id is registered
        nodeid = self._id(ref.model, relpath)
        return Entry(nodeid, self._attr(nodeid, model, relpath), MODEL_TTL_S, MODEL_TTL_S)

    def getattr(self, nodeid: int) -> tuple[Attr, float]:
        """Attributes and how long the kernel may cache them."""
        if nodeid == ROOT_ID:
            attrs = dir_attrs(len(self._model_names()), self._started_ns)
            return _to_attr(ROOT_ID, attrs), ROOT_TTL_S
        ref = self._ref(nodeid)
        return self._attr(nodeid, self._model(ref.model), ref.relpath), MODEL_TTL_S

    def readdir(self, nodeid: int) -> list[Dirent]:
        """Every entry of a directory, "." and ".." first (the caller slices by offset)."""
        dots = [Dirent(nodeid, b".", DT_DIR), Dirent(ROOT_ID, b"..", DT_DIR)]
        if nodeid == ROOT_ID:
            names = self._model_names()
            return dots + [Dirent(node_id(name, ""), _fs(name), DT_DIR) for name in names]
        ref = self._ref(nodeid)
        model = self._model(ref.model)
        node = self._node(model, ref.relpath)
        if not isinstance(node, Directory):
            raise FuseError(errno.ENOTDIR)
        entries = dots
        for name in node.children:
            relpath = f"{ref.relpath}/{name}" if ref.relpath else name
            kind = DT_DIR if isinstance(model.tree.lookup(relpath), Directory) else DT_REG
            entries.append(Dirent(node_id(ref.model, relpath), _fs(name), kind))
        return entries

    def opendir(self, nodeid: int) -> None:
        if nodeid != ROOT_ID:
            ref = self._ref(nodeid)
            if not isinstance(self._node(self._model(ref.model), ref.relpath), Directory):
                raise FuseError(errno.ENOTDIR)

    def statfs(self) -> StatFs:
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
        blocks = (total_bytes + STATFS_BLOCK - 1) // STATFS_BLOCK
        return StatFs(blocks=blocks, files=inodes, bsize=STATFS_BLOCK, namelen=NAME_MAX)

    # -- data -----------------------------------------------------------------------------------

    def open(self, nodeid: int, flags: int) -> int:
        """Open a file for reading; returns a random 63-bit handle (unique across processes)."""
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            self.refuse()
        opened = self._open_provider(nodeid)
        with self._open_guard:
            fh = _new_handle(self._open)
            self._open[fh] = opened
        return fh

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        opened = self._handle(nodeid, fh)
        want = min(size, opened.size - offset)
        if want <= 0:
            return b""
        try:
            data = self._provider.read(opened.handle, offset, want)
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc)
        if len(data) != want:
            log.error(
                "fuse: provider returned %d bytes for %d at %d of node %#x",
                len(data),
                want,
                offset,
                nodeid,
            )
            self.stats.record_error(ErrorKind.IO)
            raise FuseError(errno.EIO)
        self.stats.record_read(want)
        return data

    def release(self, fh: int) -> None:
        """Close a handle; one this process never issued nor adopted has nothing to close."""
        with self._open_guard:
            opened = self._open.pop(fh, None)
        if opened is None:
            return
        try:
            self._provider.release(opened.handle)
        except Exception as exc:  # noqa: BLE001  # the file is closed either way; count and log
            self.stats.record_error(classify(exc).kind)
            log.warning("fuse: releasing handle %#x failed: %s", fh, exc)

    def refuse(self) -> NoReturn:
        """Every write-type operation: EROFS, counted."""
        self.stats.record_error(ErrorKind.READ_ONLY)
        raise FuseError(errno.EROFS)

    # -- helpers --------------------------------------------------------------------------------

    def _handle(self, nodeid: int, fh: int) -> _Open:
        with self._open_guard:
            opened = self._open.get(fh)
        if opened is not None:
            return opened
        with self._adopt_guard:  # rare (after a hand-over): one adoption at a time
            with self._open_guard:
                opened = self._open.get(fh)
            if opened is None:
                opened = self._open_provider(nodeid)
                with self._open_guard:
                    self._open[fh] = opened
                log.info("fuse: adopted file handle %#x of node %#x", fh, nodeid)
        return opened

    def _open_provider(self, nodeid: int) -> _Open:
        if nodeid == ROOT_ID:
            raise FuseError(errno.EISDIR)
        ref = self._ref(nodeid)
        node = self._node(self._model(ref.model), ref.relpath)
        if isinstance(node, Directory):
            raise FuseError(errno.EISDIR)
        try:
            handle = self._provider.open_file(ref.model, ref.relpath)
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc)
        return _Open(handle, node.size)

    def _id(self, model: str, relpath: str) -> int:
        try:
            return self.nodes.id_for(model, relpath)
        except NodeClashError as exc:
            log.error("fuse: %s", exc)
            self.stats.record_error(ErrorKind.IO)
            raise FuseError(errno.EIO) from exc

    def _ref(self, nodeid: int) -> NodeRef:
        """What a node id names; loads every model once per burst of unknown ids."""
        ref = self.nodes.resolve(nodeid)
        if ref is not None:
            return ref
        seen = self._rebuilds
        with self._rebuild_guard:
            ref = self.nodes.resolve(nodeid)
            recent = time.monotonic() - self._last_rebuild < self._rebuild_interval_s
            if ref is None and self._rebuilds == seen and not recent:
                self._load_all_models()
                self._rebuilds += 1
                self._last_rebuild = time.monotonic()
                ref = self.nodes.resolve(nodeid)
        if ref is None:
            raise FuseError(errno.ESTALE)
        return ref

    def _load_all_models(self) -> None:
        names = self._model_names()
        log.info("fuse: unknown node id: loading the trees of %d models", len(names))
        for name in names:
            try:
                self._model(name)
            except OSError as exc:
                log.warning("fuse: cannot load model %s: %s", name, exc)

    def _attr(self, nodeid: int, model: _Model, relpath: str) -> Attr:
        node = self._node(model, relpath)
        if isinstance(node, Directory):
            return _to_attr(nodeid, dir_attrs(node.subdirs, model.time_ns))
        return _to_attr(nodeid, file_attrs(node, model.time_ns))

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
        for clash in self.nodes.add_model(name, model.tree.nodes):
            log.error("fuse: %s", clash)
        with self._trees_guard:
            self._trees[name] = model
            while len(self._trees) > self._tree_cache_size:
                self._trees.popitem(last=False)
        return model

    def _load_model(self, name: str) -> _Model:
        if not is_model_name(name):
            raise FuseError(errno.ENOENT)
        try:
            listing = self._provider.listing(name)
            tree = ModelTree.build(listing.files)
        except UnsafePathError as exc:
            log.error("fuse: model %s has an unusable file list: %s", name, exc)
            self.stats.record_error(ErrorKind.IO)
            raise FuseError(errno.EIO) from exc
        except Exception as exc:  # noqa: BLE001  # every provider failure becomes an errno
            self._raise_for(exc, count_missing=False)
        return _Model(tree, int(listing.created * 1_000_000_000))

    @staticmethod
    def _node(model: _Model, relpath: str) -> Node:
        node = model.tree.lookup(relpath)
        if node is None:
            raise FuseError(errno.ENOENT)
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
        raise FuseError(failure.errno) from exc


def _to_attr(nodeid: int, attrs: dict[str, int]) -> Attr:
    return Attr(
        ino=nodeid,
        mode=attrs["st_mode"],
        nlink=attrs["st_nlink"],
        size=attrs["st_size"],
        time_ns=attrs["st_mtime"],
    )


def _fs(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _new_handle(taken: dict[int, _Open]) -> int:
    """A random non-zero 63-bit handle: one the previous agent issued is unlikely to repeat."""
    while True:
        fh = secrets.randbits(63)
        if fh and fh not in taken:
            return fh
