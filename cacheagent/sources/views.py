"""Views of a model (``ViewRef``): a subset of its files, or the Hugging Face cache layout. Pure.

A view is a model of its own: its manifest is a small synthesized document naming the base
manifest digest and the view options, so its digest (the cache key) differs from the full
model's and from every other view's, while its files are the same blobs. ``narrow`` runs right
after resolution: it drops the raw layers the view does not keep, so their bytes are never
fetched; tar layers are fetched whole (their members are only known once unpacked) and
``assemble`` filters their members.

Hugging Face cache layout (``hf-cache=org/name``), as ``huggingface_hub`` reads it offline::

    models--org--name/refs/main                      the snapshot's commit, as text
    models--org--name/snapshots/<commit>/<path>      every file of the view
    models--org--name/blobs/<sha256 hex>             each blob once

Files are hard links (not the symlinks ``huggingface_hub`` writes: a pod cannot follow a link to
a host path, and the library reads regular files in ``snapshots/`` as well). The commit is the
Hub commit for ``hf://`` references and the first 40 hex digits of the manifest digest
otherwise; ``refs/main`` names it (a volume holds one snapshot, which is what a pod loading
without a revision asks for), and an ``hf://`` ref at a named revision gets ``refs/<revision>``
as well.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from cacheagent.digest import sha256_digest
from cacheagent.errors import SourceError
from cacheagent.refs import HfRef, ModelRef, ViewRef
from cacheagent.sources.base import Layer, ResolvedModel, Source
from cacheagent.sources.modelcar import stack_layers
from cacheagent.store import ModelFile
from cacheagent.viewopts import ViewOptions

VIEW_MEDIA_TYPE = "application/vnd.cacheagent.model-view.v1+json"
_WEIGHT_MEDIA_PREFIXES = (
    "application/vnd.cncf.model.weight.v1.",
    "application/vnd.cnai.model.weight.v1.",
)


async def resolve_model(source: Source, ref: ModelRef) -> ResolvedModel:
    """``source.resolve(ref)``, and for a view, its base narrowed to the view."""
    if not isinstance(ref, ViewRef):
        return await source.resolve(ref)
    return narrow(await source.resolve(ref.base), ref)


def narrow(base: ResolvedModel, ref: ViewRef) -> ResolvedModel:
    """The view's model: the base's layers it keeps, under the view's own digest."""
    opts = ref.options
    layers = tuple(_placed(layer, base, opts) for layer in base.layers if _kept(layer, opts))
    if not layers:
        raise SourceError(f"{ref}: the view keeps none of the model's files")
    manifest = json.dumps(
        {"mediaType": VIEW_MEDIA_TYPE, "base": base.manifest_digest, "view": opts.suffix},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return ResolvedModel(
        ref=ref,
        manifest_digest=sha256_digest(manifest),
        manifest=manifest,
        layers=layers,
        artifact_type=base.artifact_type,
        inline_files=_hf_refs(base, ref) if opts.hf_cache else (),
    )


def assemble(resolved: ResolvedModel, groups: Sequence[Sequence[ModelFile]]) -> list[ModelFile]:
    """The model's files from the per-layer lists (aligned with ``resolved.layers``): modelcar
    layers stacked, then the view applied to what tar layers unpacked."""
    layers = resolved.layers
    if any(layer.subtree for layer in layers):
        files = stack_layers(groups)
        placed = [False] * len(files)
    else:
        files = [f for group in groups for f in group]
        pairs = zip(layers, groups, strict=True)
        placed = [layer.unpack == "raw" for layer, group in pairs for _ in group]
    if not isinstance(resolved.ref, ViewRef):
        return files
    opts = resolved.ref.options
    root = _snapshot_dir(resolved) if opts.hf_cache else ""
    out = [
        f if done else dataclasses.replace(f, path=_join(root, f.path))
        for f, done in zip(files, placed, strict=True)
        if done or opts.keeps(f.path)
    ]
    if not out:
        raise SourceError(f"{resolved.ref}: the view keeps none of the model's files")
    if opts.hf_cache:
        out += _hf_blobs(opts, out)
    return out


def _kept(layer: Layer, opts: ViewOptions) -> bool:
    if opts.exclude_weights and layer.blob.media_type.startswith(_WEIGHT_MEDIA_PREFIXES):
        return False
    return layer.unpack != "raw" or opts.keeps(layer.path)


def _placed(layer: Layer, base: ResolvedModel, opts: ViewOptions) -> Layer:
    if not opts.hf_cache or layer.unpack != "raw":
        return layer
    return dataclasses.replace(layer, path=_join(_snapshot_dir(base, opts), layer.path))


def _repo_dir(opts: ViewOptions) -> str:
    return "models--" + opts.hf_cache.replace("/", "--")


def _commit(base: ResolvedModel) -> str:
    ref = base.ref.base if isinstance(base.ref, ViewRef) else base.ref
    if isinstance(ref, HfRef):
        try:
            commit = json.loads(base.manifest)["commit"]
        except (ValueError, KeyError, TypeError):
            commit = None
        if isinstance(commit, str):
            return commit
    return base.manifest_digest.removeprefix("sha256:")[:40]


def _snapshot_dir(model: ResolvedModel, opts: ViewOptions | None = None) -> str:
    if opts is None:
        assert isinstance(model.ref, ViewRef)
        opts = model.ref.options
        commit = _view_commit(model)
    else:
        commit = _commit(model)
    return f"{_repo_dir(opts)}/snapshots/{commit}"


def _view_commit(view: ResolvedModel) -> str:
    """The commit a view presents, read back from its ``refs/main`` inline file."""
    for path, data in view.inline_files:
        if path.endswith("/refs/main"):
            return data.decode()
    raise SourceError(f"{view.ref}: Hugging Face cache view without refs/main")


def _hf_refs(base: ResolvedModel, ref: ViewRef) -> tuple[tuple[str, bytes], ...]:
    commit = _commit(base).encode()
    repo = _repo_dir(ref.options)
    names = ["main"]
    if isinstance(ref.base, HfRef) and not ref.base.is_immutable and ref.base.revision != "main":
        names.append(ref.base.revision)
    return tuple((f"{repo}/refs/{name}", commit) for name in names)


def _hf_blobs(opts: ViewOptions, files: Sequence[ModelFile]) -> list[ModelFile]:
    blobs = {f.blob: f for f in files}
    repo = _repo_dir(opts)
    return [
        ModelFile(f"{repo}/blobs/{digest.removeprefix('sha256:')}", digest, f.size)
        for digest, f in sorted(blobs.items())
    ]


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path
