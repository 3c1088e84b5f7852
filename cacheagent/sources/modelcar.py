"""Stack a modelcar's image layers into one model tree. Pure.

A modelcar (KServe's convention) is a container image whose files under ``/models`` are the
model. Its layers are unpacked with ``tarsafe.unpack_tar(..., subtree="models")``, which keeps
only that subtree; this module stacks the per-layer file lists in layer order, as an overlay
filesystem would (the OCI image-spec layer rules):

* a file in a higher layer replaces the same path below, and replaces a whole directory of that
  name (and a directory replaces a file);
* ``.wh.<name>`` removes ``<name>`` (file or directory) from the layers below;
* ``.wh..wh..opq`` in a directory removes everything the layers below put in that directory;
* whiteouts only act on lower layers, and never appear in the result.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

from cacheagent.errors import SourceError
from cacheagent.store import ModelFile

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


def stack_layers(groups: Sequence[Sequence[ModelFile]]) -> list[ModelFile]:
    """Overlay the files of each layer (lowest first); raises SourceError if nothing is left."""
    merged: dict[str, ModelFile] = {}
    for group in groups:
        files = []
        for entry in group:
            directory, name = posixpath.split(entry.path)
            if name == OPAQUE_WHITEOUT:
                _remove_below(merged, directory)
            elif name.startswith(WHITEOUT_PREFIX):
                hidden = posixpath.join(directory, name.removeprefix(WHITEOUT_PREFIX))
                merged.pop(hidden, None)
                _remove_below(merged, hidden)
            else:
                files.append(entry)
        for entry in files:
            _remove_below(merged, entry.path)
            for parent in _parents(entry.path):
                merged.pop(parent, None)
            merged[entry.path] = entry
    if not merged:
        raise SourceError(
            "the image has no files under /models: neither a model artifact nor a modelcar"
        )
    return sorted(merged.values(), key=lambda f: f.path)


def _remove_below(merged: dict[str, ModelFile], directory: str) -> None:
    if not directory:
        merged.clear()
        return
    prefix = directory + "/"
    for path in [p for p in merged if p.startswith(prefix)]:
        del merged[path]


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:depth]) for depth in range(1, len(parts))]
