"""Content digests (``sha256:<64 hex>``): parsing and incremental hashing. Pure."""

from __future__ import annotations

import hashlib
import re

from cacheagent.errors import DigestMismatchError

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


def check_digest(value: str) -> str:
    """Return ``value`` if it is a sha256 digest we can store, else raise ValueError."""
    if not is_digest(value):
        raise ValueError(f"not a sha256 digest (want 'sha256:' + 64 lowercase hex): {value!r}")
    return value


def hex_of(digest: str) -> str:
    return check_digest(digest).split(":", 1)[1]


def short_digest(digest: str, n: int = 12) -> str:
    """The first hex digits of a digest, for humans and bounded metric labels."""
    return digest.split(":", 1)[-1][:n]


def sha256_digest(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


class DigestVerifier:
    """Hashes bytes as they stream past and checks the result against the expected digest."""

    def __init__(self, expected: str) -> None:
        self.expected = check_digest(expected)
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def actual(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"

    def verify(self) -> None:
        actual = self.actual
        if actual != self.expected:
            raise DigestMismatchError(self.expected, actual)
