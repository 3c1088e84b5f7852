"""ModelService.model_files against a pull that completes between its two store reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from cacheagent.errors import ModelNotFoundError
from cacheagent.service import ModelService

DIGEST = "sha256:" + "cd" * 32


class CommittingStore:
    """The pending record is replaced by the ready model right after the first get_model."""

    def __init__(self) -> None:
        self.ready: Any = SimpleNamespace(files=("weights",), created=12.0)
        self.model_reads = 0

    def add_removal_observer(self, observer: object) -> None:
        pass

    def get_model(self, digest: str) -> Any:
        self.model_reads += 1
        return None if self.model_reads == 1 else self.ready

    def get_pending(self, digest: str) -> Any:
        return None  # already replaced by the ready model


def _service(store: object) -> ModelService:
    return ModelService(cast(Any, store), cast(Any, SimpleNamespace()))


def test_a_model_committed_between_the_reads_is_found() -> None:
    store = CommittingStore()
    files, created = _service(store).model_files(DIGEST)
    assert created == 12.0
    assert files is store.ready.files
    assert store.model_reads == 2


def test_a_model_in_neither_table_is_not_found() -> None:
    store = CommittingStore()
    store.ready = None
    with pytest.raises(ModelNotFoundError, match=DIGEST):
        _service(store).model_files(DIGEST)
