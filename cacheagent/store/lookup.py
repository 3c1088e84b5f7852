"""Find a model the way people name it: a digest, a 6+ hex digest prefix, or a reference."""

from __future__ import annotations

from cacheagent.digest import is_digest
from cacheagent.errors import RefError
from cacheagent.refs import parse_ref
from cacheagent.store.records import Model
from cacheagent.store.store import Store

MIN_PREFIX = 6


def find_model(store: Store, text: str) -> Model | None:
    """The ready model ``text`` names; None when nothing (or more than one prefix) matches."""
    if is_digest(text):
        return store.get_model(text)
    try:
        canonical: str | None = parse_ref(text).canonical
    except RefError:
        canonical = None
    if canonical is not None:
        digest = store.lookup_ref(canonical)
        model = store.get_model(digest) if digest else None
        if model is not None:
            return model
    models = store.list_models()
    if canonical is not None:
        for model in models:
            if model.ref == canonical or canonical in model.refs:
                return model
    prefix = text.removeprefix("sha256:")
    if len(prefix) < MIN_PREFIX:
        return None
    matches = [m for m in models if m.digest.removeprefix("sha256:").startswith(prefix)]
    return matches[0] if len(matches) == 1 else None
