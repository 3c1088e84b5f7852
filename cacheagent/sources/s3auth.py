"""AWS Signature Version 4 for S3 requests, by botocore (no hand-written SigV4).

Credentials come, in order, from the static pair in config (``s3.access_key_id`` and the file
holding the secret), else botocore's standard provider chain: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, the shared credentials and config files
(``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``, ``AWS_PROFILE`` or ``s3.profile``),
web identity, container and instance roles. The chain is consulted once, in a worker thread
(it reads files and may ask a metadata endpoint), and refreshable credentials are frozen per
request in a worker thread too. Secrets never reach a log or an error message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError
from botocore.session import Session

from cacheagent.errors import SourceError


@dataclass(frozen=True)
class S3Credentials:
    """Where credentials come from (``cacheagent.config.S3Config`` fields)."""

    access_key_id: str | None = None
    secret_access_key_file: Path | None = None
    profile: str | None = None
    anonymous: bool = False


class S3Signer:
    """Signs requests for one region; safe to share between concurrent requests."""

    def __init__(self, region: str, credentials: S3Credentials | None = None) -> None:
        self.region = region
        self._config = credentials or S3Credentials()
        self._credentials: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"S3Signer(region={self.region!r})"

    async def sign(self, method: str, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        """``headers`` plus ``Authorization``, ``X-Amz-Date`` and ``X-Amz-Content-SHA256``."""
        if self._config.anonymous:
            return dict(headers)
        source = await self._source()
        frozen = await asyncio.to_thread(source.get_frozen_credentials)
        request = AWSRequest(method=method, url=url, headers=dict(headers))
        S3SigV4Auth(frozen, "s3", self.region).add_auth(request)
        return {key: str(value) for key, value in request.headers.items()}

    async def _source(self) -> Any:
        async with self._lock:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(self._load)
            return self._credentials

    def _load(self) -> Any:
        cfg = self._config
        if cfg.access_key_id is not None and cfg.secret_access_key_file is not None:
            try:
                secret = cfg.secret_access_key_file.read_text().strip()
            except OSError as exc:
                raise SourceError(
                    f"s3.secret_access_key_file {cfg.secret_access_key_file}: {exc.strerror}"
                ) from None
            return Credentials(cfg.access_key_id, secret)
        session = Session(profile=cfg.profile) if cfg.profile else Session()
        try:
            found = session.get_credentials()
        except BotoCoreError as exc:  # profile not found, unreadable files, bad config
            raise SourceError(f"AWS credentials: {type(exc).__name__}: {exc}") from None
        if found is None:
            raise SourceError(
                "no AWS credentials for s3://: set s3.access_key_id and "
                "s3.secret_access_key_file, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a shared "
                "credentials file, or s3.anonymous for a public bucket"
            )
        return found
