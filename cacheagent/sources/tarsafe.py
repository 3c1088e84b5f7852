"""Unpack a tar layer without trusting it: member by member, into blobs, never onto the tree.

Nothing here ever calls ``tarfile``'s extract: each regular member is copied into a temporary
file (in a directory the caller chooses, normally the store's partial/) while it is hashed, and
the caller commits it as a blob. The store builds the model tree from those blobs afterwards.

Rules (each refusal names the member):

* paths go through ``store.paths.safe_relpath``: no absolute paths, no ``..``, no NUL, no
  over-long names or components; ``.`` components are dropped (``tar -C dir .`` writes ``./x``);
* symbolic links are refused, all of them: a model tree is plain files, and a link that stays
  inside the tree today is a trap for whoever copies the tree elsewhere;
* a hard link is accepted only to a regular file earlier in the same archive; it becomes a second
  file entry for the same blob (so ``on_file`` is not called for it);
* devices, FIFOs, sparse files and any other member type are refused;
* the same path twice, or a path that is a file in one member and a directory in another, is
  refused (tar would silently let the last one win);
* the bytes unpacked are bounded by ``max_total_bytes`` (checked against each member's declared
  size before a byte is written) and the member count by ``max_members``; pax and GNU long-name
  headers over 1 MiB are refused, as tarfile would hold them in memory.

Only the executable bit of a member's mode survives: files are 0o444, or 0o555 if any x bit is set.

With ``subtree`` (a container image layer of a modelcar), only members below that directory are
unpacked, with the directory stripped from their paths; every other member (the base OS: its
symlinks and devices included) is skipped unread, since none of it reaches the model tree. A
hard link from inside the subtree to a file outside it is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self, cast

import zstandard

from cacheagent.errors import SourceError, UnsafePathError
from cacheagent.sources.base import UnpackKind
from cacheagent.store.paths import safe_relpath

CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MEMBERS = 1_000_000

_HEADER_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_TYPE_NAMES = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


@dataclass(frozen=True)
class UnpackedFile:
    """One file of the unpacked tree: its model-relative path and the blob that holds it."""

    path: str
    digest: str
    size: int
    mode: int


OnFile = Callable[[UnpackedFile, Path], None]
"""Called once per regular member with the entry and its temporary file, which the callback
should move away (``Store.commit_blob(..., verified=True)``); whatever is left is deleted."""


def unpack_tar(
    src: Path,
    kind: UnpackKind,
    tmp_dir: Path,
    on_file: OnFile,
    *,
    max_total_bytes: int,
    prefix: str = "",
    max_members: int = DEFAULT_MAX_MEMBERS,
    subtree: str = "",
) -> tuple[UnpackedFile, ...]:
    """Stream-unpack the tar blob at ``src`` (module docstring has the rules).

    ``prefix`` is the directory in the model tree to unpack into (``Layer.path``). Returns every
    file entry in archive order, hard links included.
    """
    if kind == "raw":
        raise ValueError(f"{src} is a raw layer, not a tar")
    tree = _Tree(prefix=safe_relpath(prefix) if prefix else "")
    budget = _Budget(max_total_bytes=max_total_bytes, max_members=max_members)
    buffer = bytearray(CHUNK_BYTES)
    try:
        with (
            _decompressed(src, kind) as stream,
            tarfile.open(
                fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo, bufsize=CHUNK_BYTES
            ) as archive,
        ):
            for member in archive:
                budget.count_member(member.name)
                if subtree and not _within_subtree(member, subtree):
                    continue
                _unpack_member(archive, member, tree, budget, tmp_dir, on_file, buffer)
    except (tarfile.TarError, zlib.error, gzip.BadGzipFile, EOFError, zstandard.ZstdError) as exc:
        raise SourceError(f"tar layer {src.name} ({kind}) is corrupt: {exc}") from exc
    return tuple(tree.files.values())


def _within_subtree(member: tarfile.TarInfo, subtree: str) -> bool:
    """Whether ``member`` lies below ``subtree``; if so, rename it (and a hard link's target)
    relative to it. The subtree directory itself counts as outside (nothing to unpack)."""
    rel = _below(member.name, subtree)
    if rel is None:
        return False
    member.name = rel
    if member.islnk():
        target = _below(member.linkname, subtree)
        if target is None:
            raise UnsafePathError(
                f"{subtree}/{rel}", f"hard link to {member.linkname!r}, outside /{subtree}"
            )
        member.linkname = target
    return True


def _below(name: str, subtree: str) -> str | None:
    stripped = name.lstrip("/")
    while stripped.startswith("./"):
        stripped = stripped[2:].lstrip("/")
    head, slash, rest = stripped.partition("/")
    if head != subtree or not slash or not rest.strip("/"):
        return None
    return rest


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized pax / GNU long-name headers before tarfile reads them into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _HEADER_TYPES and info.size > MAX_HEADER_BYTES:
            raise SourceError(
                f"tar extended header of {info.size} bytes (over {MAX_HEADER_BYTES}) refused"
            )
        return info


@contextlib.contextmanager
def _decompressed(src: Path, kind: UnpackKind) -> Iterator[IO[bytes]]:
    with open(src, "rb") as raw:
        if kind == "tar":
            yield raw
        elif kind == "tar+gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield cast(IO[bytes], unzipped)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True, closefd=False
            )
            with reader:
                yield cast(IO[bytes], reader)


@dataclass
class _Budget:
    max_total_bytes: int
    max_members: int
    total_bytes: int = 0
    members: int = 0

    def count_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise SourceError(f"tar has more than {self.max_members} members (at {name!r})")

    def reserve(self, name: str, size: int) -> None:
        if self.total_bytes + size > self.max_total_bytes:
            raise SourceError(
                f"tar unpacks to more than the {self.max_total_bytes}-byte limit "
                f"(member {name!r} of {size} bytes after {self.total_bytes} bytes)"
            )
        self.total_bytes += size


@dataclass
class _Tree:
    """The paths unpacked so far, to refuse duplicates, file/dir clashes and dangling links."""

    prefix: str
    files: dict[str, UnpackedFile] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)

    def path_of(self, name: str, member: str, what: str = "path") -> str:
        try:
            rel = safe_relpath(name)
            return safe_relpath(f"{self.prefix}/{rel}") if self.prefix else rel
        except UnsafePathError as exc:
            detail = exc.problem if what == "path" else f"{what} {name!r}: {exc.problem}"
            raise UnsafePathError(member, detail) from exc

    def add_dir(self, path: str) -> None:
        if path in self.files:
            raise SourceError(f"tar member {path!r} is both a file and a directory")
        self._add_parents(path)
        self.dirs.add(path)

    def add_file(self, entry: UnpackedFile) -> None:
        self.check_free(entry.path)
        self._add_parents(entry.path)
        self.files[entry.path] = entry

    def check_free(self, path: str) -> None:
        if path in self.files:
            raise SourceError(f"tar member {path!r} appears twice")
        if path in self.dirs:
            raise SourceError(f"tar member {path!r} is both a file and a directory")

    def _add_parents(self, path: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in self.files:
                raise SourceError(
                    f"tar member {path!r} needs {parent!r}, a file, to be a directory"
                )
            self.dirs.add(parent)


def _unpack_member(
    archive: tarfile.TarFile,
    member: tarfile.TarInfo,
    tree: _Tree,
    budget: _Budget,
    tmp_dir: Path,
    on_file: OnFile,
    buffer: bytearray,
) -> None:
    if member.isdir():
        if member.name.rstrip("/") not in ("", "."):
            tree.add_dir(tree.path_of(member.name, member.name))
        return
    if member.issparse() or not (member.isreg() or member.islnk()):
        what = _TYPE_NAMES.get(member.type, f"type {member.type!r}")
        raise UnsafePathError(member.name, f"{what} members are refused")
    path = tree.path_of(member.name, member.name)
    tree.check_free(path)
    if member.islnk():
        tree.add_file(_hard_link(member, path, tree))
        return
    budget.reserve(member.name, member.size)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".untar-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _copy_member(archive, member, out, buffer)
        entry = UnpackedFile(path, digest, member.size, 0o555 if member.mode & 0o111 else 0o444)
        tree.add_file(entry)
        on_file(entry, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _hard_link(member: tarfile.TarInfo, path: str, tree: _Tree) -> UnpackedFile:
    target = tree.path_of(member.linkname, member.name, what="hard link target")
    linked = tree.files.get(target)
    if linked is None:
        raise UnsafePathError(
            member.name,
            f"hard link to {member.linkname!r}, which is not a file earlier in this archive",
        )
    return UnpackedFile(path, linked.digest, linked.size, linked.mode)


def _copy_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, out: IO[bytes], buffer: bytearray
) -> str:
    reader = archive.extractfile(member)
    if reader is None:  # pragma: no cover - only for non-regular members, filtered above
        raise SourceError(f"tar member {member.name!r} has no data")
    digest = hashlib.sha256()
    view = memoryview(buffer)
    copied = 0
    with reader:
        while n := reader.readinto(view):  # type: ignore[attr-defined]
            digest.update(view[:n])
            out.write(view[:n])
            copied += n
    if copied != member.size:
        raise SourceError(f"tar member {member.name!r} is truncated ({copied}/{member.size} bytes)")
    return f"sha256:{digest.hexdigest()}"
