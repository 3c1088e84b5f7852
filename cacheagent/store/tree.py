"""Model trees: directories of hard links to blobs, built aside and renamed into place.

A tree is built in ``models/sha256/.tmp-<hex>-<tag>``, its directories are made 0555 and
fsynced, and only then renamed to ``models/sha256/<hex>``; the index row is written after the
rename is durable. So a path ``models/sha256/<hex>`` either does not exist or is a complete tree,
and a crash leaves at worst a ``.tmp-*`` tree or an unindexed tree, both of which reconciliation
deletes. Deleting goes the other way: rename to ``.tmp-*`` (the model path vanishes at once),
make the directories writable again, remove.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cacheagent.store.blobs import fsync_dir
from cacheagent.store.crashpoints import crashpoint
from cacheagent.store.paths import TreeShape

DIR_MODE = 0o555
_WRITABLE_DIR_MODE = 0o755


@dataclass(frozen=True)
class TreeProblem:
    """Why a tree on disk does not match its index record (reconciliation drops such models)."""

    path: str
    problem: str


def build(tmp: Path, final: Path, shape: TreeShape, sources: Mapping[str, Path]) -> None:
    """Materialise ``shape`` (file path -> blob file in ``sources``) at ``final`` atomically."""
    remove(tmp)
    tmp.mkdir(mode=_WRITABLE_DIR_MODE)
    for directory in shape.dirs:
        (tmp / directory).mkdir(mode=_WRITABLE_DIR_MODE)
    for path in shape.files:
        os.link(sources[path], tmp / path)
    crashpoint("tree.after_link")
    for built in [*(tmp / d for d in reversed(shape.dirs)), tmp]:
        built.chmod(DIR_MODE)
        fsync_dir(built)
    crashpoint("tree.after_chmod")
    remove(final)
    tmp.rename(final)
    crashpoint("tree.after_rename")
    fsync_dir(final.parent)
    crashpoint("tree.after_dir_fsync")


def repair(final: Path, shape: TreeShape, sources: Mapping[str, Path]) -> int:
    """Make the existing tree at ``final`` match ``shape`` without replacing its directories
    (a pod may have them bind-mounted): each wrong or missing file is linked aside and renamed
    over its name, atomically. Returns how many files were replaced."""
    replaced = 0
    dirs = [final, *(final / d for d in shape.dirs)]
    for directory in dirs:
        directory.mkdir(mode=_WRITABLE_DIR_MODE, exist_ok=True)
        directory.chmod(_WRITABLE_DIR_MODE)
    try:
        for path in shape.files:
            target, source = final / path, sources[path]
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(target.lstat(), source.stat()):
                    continue
            aside = target.with_name(f".tmp-repair-{target.name}")
            aside.unlink(missing_ok=True)
            os.link(source, aside)
            aside.rename(target)
            replaced += 1
    finally:
        for directory in reversed(dirs):
            directory.chmod(DIR_MODE)
            fsync_dir(directory)
    return replaced


def move_aside(path: Path, aside: Path) -> bool:
    """Take a tree out of view in one rename (to a ``.tmp-*`` name that reconciliation
    deletes if we crash before ``remove`` finishes). False if there was no tree."""
    remove(aside)
    try:
        path.rename(aside)
    except FileNotFoundError:
        return False
    return True


def remove(path: Path) -> None:
    """Delete a tree whatever its modes (a missing one is fine, and so are entries a concurrent
    reconciliation deletes first)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    for directory, _, _ in os.walk(path):  # top-down: a directory is writable before its entries go
        with contextlib.suppress(FileNotFoundError):
            Path(directory).chmod(_WRITABLE_DIR_MODE)
    shutil.rmtree(path, onerror=_gone_is_fine)


def _gone_is_fine(
    _function: object, _path: str, info: tuple[type[BaseException], BaseException, object]
) -> None:
    if not isinstance(info[1], FileNotFoundError):
        raise info[1]


def check(
    root: Path, expected: Mapping[str, tuple[int, int]], dirs: Sequence[str]
) -> tuple[list[TreeProblem], int]:
    """Compare a tree with its record: every file a hard link to its blob (``expected`` maps
    path -> (st_dev, st_ino) of the blob), nothing extra. Fixes directory modes on the way;
    returns the problems and the number of modes fixed."""
    if not root.is_dir() or root.is_symlink():
        return [TreeProblem("", "model directory missing")], 0
    problems: list[TreeProblem] = []
    fixed = 0
    for directory in ["", *dirs]:
        try:
            st = os.lstat(root / directory)
        except FileNotFoundError:
            problems.append(TreeProblem(directory, "directory missing"))
            continue
        if not stat.S_ISDIR(st.st_mode):
            problems.append(TreeProblem(directory, "not a directory"))
        elif stat.S_IMODE(st.st_mode) != DIR_MODE:
            (root / directory).chmod(DIR_MODE)
            fixed += 1
    for path, (dev, ino) in expected.items():
        try:
            st = os.lstat(root / path)
        except FileNotFoundError:
            problems.append(TreeProblem(path, "file missing"))
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (dev, ino):
            problems.append(TreeProblem(path, "not a hard link to its blob"))
    problems.extend(_extra_entries(root, set(expected), {"", *dirs}))
    return problems, fixed


def _extra_entries(root: Path, files: set[str], dirs: set[str]) -> list[TreeProblem]:
    extra: list[TreeProblem] = []
    for directory, subdirs, names in os.walk(root):
        rel = os.path.relpath(directory, root)
        rel = "" if rel == "." else rel
        for name in [*subdirs, *names]:
            path = f"{rel}/{name}" if rel else name
            if path not in files and path not in dirs:
                extra.append(TreeProblem(path, "not part of the model"))
    return extra
