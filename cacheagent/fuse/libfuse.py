"""Import mfusepy bound to libfuse 3.

mfusepy picks ``libfuse.so.2`` when both libraries are installed, and with libfuse 2 the kernel
never sends reads larger than 128 KiB. This module points mfusepy at libfuse 3 for the import
(mfusepy reads ``FUSE_LIBRARY_PATH`` only then) and refuses to run on anything else.
"""

from __future__ import annotations

import ctypes
import os
from ctypes.util import find_library
from types import ModuleType


def _import_mfusepy() -> ModuleType:
    chosen = os.environ.get("FUSE_LIBRARY_PATH")
    if chosen is None:
        found = find_library("fuse3")
        if found is None:
            raise ImportError("libfuse 3 is not installed (apt-get install fuse3 libfuse3-3)")
        os.environ["FUSE_LIBRARY_PATH"] = found
    try:
        import mfusepy  # imported here: it reads the environment set above
    finally:
        if chosen is None:
            del os.environ["FUSE_LIBRARY_PATH"]
    if mfusepy.fuse_version_major != 3:
        raise ImportError(
            f"mfusepy loaded libfuse {mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor} "
            f"from {mfusepy._libfuse_path}; cacheagent needs libfuse 3 (1 MiB reads)"
        )
    module: ModuleType = mfusepy
    return module


mfusepy = _import_mfusepy()
FUSE = mfusepy.FUSE
FuseOSError = mfusepy.FuseOSError
Operations = mfusepy.Operations


def context_fuse() -> int | None:
    """The ``struct fuse *`` of the request this thread is handling; call it in a callback."""
    context = mfusepy._libfuse.fuse_get_context()
    if not context:
        return None
    pointer: int | None = context.contents.fuse
    return pointer


def invalidate_path(fuse: int, path: str) -> int:
    """Drop the kernel's cached pages and attributes of ``path`` (``fuse_invalidate_path``).

    Returns 0, or a negative errno: ``-ENOENT`` when the kernel holds nothing for the path.
    Never call it from a FUSE callback: the kernel may wait for that very request's pages.
    """
    function = mfusepy._libfuse.fuse_invalidate_path
    function.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    function.restype = ctypes.c_int
    result: int = function(ctypes.c_void_p(fuse), os.fsencode(path))
    return result
