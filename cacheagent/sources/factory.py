"""Build every origin from the config, sharing one HTTP transport (one connection pool)."""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import dataclass

from cacheagent.config import Config, PullConfig
from cacheagent.sources.base import Source
from cacheagent.sources.credentials import CredentialStore
from cacheagent.sources.guard import OriginGuard
from cacheagent.sources.hf import HfOptions, HfSource
from cacheagent.sources.hftoken import resolve_hf_token
from cacheagent.sources.http import HttpOptions, HttpSource
from cacheagent.sources.layout import OciLayoutSource
from cacheagent.sources.registry import RegistryOptions, RegistrySource
from cacheagent.sources.retry import RetryPolicy
from cacheagent.sources.s3 import S3Options, S3Source
from cacheagent.sources.s3auth import S3Credentials, S3Signer
from cacheagent.sources.transport import Transport, TransportOptions, environment_proxies

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le"}


def node_platform() -> tuple[str, str]:
    """The (os, architecture) pair OCI image indexes use for this node."""
    machine = _platform.machine().lower()
    return "linux", _ARCH.get(machine, machine)


@dataclass
class Origins:
    """The configured sources and the transport they share; closing it closes both."""

    sources: list[Source]
    transport: Transport

    async def aclose(self) -> None:
        for source in self.sources:
            await source.aclose()
        await self.transport.aclose()


def retry_policy(pull: PullConfig) -> RetryPolicy:
    """The one retry policy of every origin and of the download pipeline, from ``pull.*``."""
    return RetryPolicy(
        max_attempts=pull.retries + 1,
        max_delay=pull.retry_max_seconds,
        max_server_wait=pull.rate_limit_max_wait_seconds,
    )


def build_sources(config: Config) -> Origins:
    pull, registries = config.pull, config.registries
    options = TransportOptions(
        ca_file=registries.ca_file,
        insecure=frozenset(registries.insecure),
        proxies=dict(registries.proxy),
        max_connections=pull.max_connections_total,
        max_connections_per_host=pull.max_connections_per_origin,
        read_timeout=pull.timeout_seconds,
    )
    transport = Transport(options)
    # URL origins get their own transport, held to the policy's redirect and address rules.
    # Proxies the operator set (config or the agent's environment) are trusted alike.
    env_proxies = [url for key, url in environment_proxies().items() if key != "no"]
    guard = OriginGuard.with_proxies(config.policy, [*registries.proxy.values(), *env_proxies])
    http_transport = Transport(guard.transport_options(options))
    retry = retry_policy(pull)
    token = resolve_hf_token(config.hf.token_file, os.environ)
    sources: list[Source] = [
        OciLayoutSource(platform=node_platform(), manifest_max_bytes=pull.manifest_max_bytes),
        RegistrySource(
            transport,
            credentials=CredentialStore(docker_config=registries.docker_config),
            options=RegistryOptions(
                mirrors={k: tuple(v) for k, v in registries.mirrors.items()},
                platform=node_platform(),
                manifest_max_bytes=pull.manifest_max_bytes,
                retry=retry,
            ),
        ),
        HttpSource(http_transport, options=HttpOptions(retry=retry), owns_transport=True),
        HfSource(
            transport, options=HfOptions(endpoint=config.hf.endpoint, token=token, retry=retry)
        ),
        _s3_source(config, transport, retry),
    ]
    return Origins(sources, transport)


def _s3_source(config: Config, transport: Transport, retry: RetryPolicy) -> S3Source:
    s3 = config.s3
    signer = S3Signer(
        s3.region,
        S3Credentials(
            access_key_id=s3.access_key_id,
            secret_access_key_file=s3.secret_access_key_file,
            profile=s3.profile,
            anonymous=s3.anonymous,
        ),
    )
    options = S3Options(
        endpoint=s3.endpoint, region=s3.region, addressing=s3.addressing, retry=retry
    )
    return S3Source(transport, signer=signer, options=options)
