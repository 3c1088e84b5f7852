"""The agent's one typed configuration: defaults, then a YAML file, then environment, then flags.

Modules: ``values`` (value parsers and the ``Annotated`` metadata), ``schema`` (the sections and
their defaults and bounds), ``convert`` (raw value -> typed value, driven by the annotations),
``loader`` (the layers and where each setting came from), ``effective`` (the configuration as
a file would say it, for ``cacheagent config``). Import from ``cacheagent.config``.
"""

from __future__ import annotations

from cacheagent.config.effective import effective_json, effective_values, effective_yaml
from cacheagent.config.loader import ENV_PREFIX, Layered, Origin, load_config, load_layered
from cacheagent.config.schema import (
    AgentConfig,
    Config,
    CsiConfig,
    FuseConfig,
    HfConfig,
    PeersConfig,
    PolicyConfig,
    PrefetchConfig,
    PullConfig,
    RegistriesConfig,
    S3Config,
    StoreConfig,
    parse_host_pattern,
    parse_network,
)
from cacheagent.config.values import (
    Capacity,
    parse_byte_size,
    parse_csi_driver_name,
    parse_duration,
    parse_group,
    parse_http_url,
    parse_listen_address,
    parse_socket_mode,
)

__all__ = [
    "ENV_PREFIX",
    "AgentConfig",
    "Capacity",
    "Config",
    "CsiConfig",
    "FuseConfig",
    "HfConfig",
    "Layered",
    "Origin",
    "PeersConfig",
    "PolicyConfig",
    "PrefetchConfig",
    "PullConfig",
    "RegistriesConfig",
    "S3Config",
    "StoreConfig",
    "effective_json",
    "effective_values",
    "effective_yaml",
    "load_config",
    "load_layered",
    "parse_byte_size",
    "parse_csi_driver_name",
    "parse_duration",
    "parse_group",
    "parse_host_pattern",
    "parse_http_url",
    "parse_listen_address",
    "parse_network",
    "parse_socket_mode",
]
