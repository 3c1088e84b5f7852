"""Where HTTP origins (``https://host/file#sha256=``) may lead: redirects and addresses.

A URL reference can come from a pod, and the agent fetches it from the node's network
position, so an HTTP origin is held to two rules (``cacheagent.policy`` decides them):

- a redirect may only go to the URL's own host or a host the policy allows
  (``policy.pod_http_hosts``, ``policy.http_redirect_hosts``);
- no connection goes to a loopback, link-local or unspecified address unless
  ``policy.http_allowed_networks`` holds it.

The address rule is applied to the addresses a name resolves to, inside the connector's
resolver (``GuardedResolver``): aiohttp connects only to what the resolver returns, so the
address checked is the address connected to, and a name that resolves to a public address
once and to 127.0.0.1 the next time (DNS rebinding) is caught the second time too. IP literals
never reach a resolver, so ``check_hop`` checks them before each request. A configured
upstream proxy (``registries.proxy``, or one the agent's environment names) is trusted: its
own address is not checked, and the target's address is then the proxy's business.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from cacheagent.errors import PolicyDeniedError
from cacheagent.policy import HttpRules, address_allowed, redirect_allowed
from cacheagent.sources.transport import TransportOptions, host_port, redact_url


@dataclass(frozen=True)
class OriginGuard:
    """The policy's HTTP-origin rules, as hooks for ``Transport``."""

    rules: HttpRules
    exempt_hosts: frozenset[str] = frozenset()

    @classmethod
    def with_proxies(cls, rules: HttpRules, proxies: Iterable[str]) -> OriginGuard:
        hosts = {(URL(proxy).host or "").lower() for proxy in proxies}
        return cls(rules, frozenset(hosts - {""}))

    def transport_options(self, base: TransportOptions) -> TransportOptions:
        return dataclasses.replace(base, resolver=self.resolver, check_hop=self.check_hop)

    def resolver(self) -> AbstractResolver:
        return GuardedResolver(self)

    def check_hop(self, first: URL, hop: URL) -> None:
        """Raise ``PolicyDeniedError`` for a redirect to a host not allowed, or an IP literal
        in a refused range (names are checked when they resolve)."""
        origin, target = host_port(first), host_port(hop)
        if not redirect_allowed(self.rules, origin, target):
            raise PolicyDeniedError(
                f"{redact_url(first)} redirects to {redact_url(hop)}, a host the policy does "
                f"not allow; list {hop.host} in policy.http_redirect_hosts to follow it",
                "policy.http_redirect_hosts",
            )
        try:
            literal = ipaddress.ip_address(hop.host or "")
        except ValueError:
            return
        self.check_address(hop.host or "", literal)

    def check_address(
        self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> None:
        if not address_allowed(self.rules, address):
            raise PolicyDeniedError(
                f"HTTP origin {host} is at {address}, a loopback, link-local or unspecified "
                "address; list its network in policy.http_allowed_networks to allow it",
                "policy.http_allowed_networks",
            )


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver with refused addresses taken out; none left is PolicyDeniedError.

    The error is not an OSError on purpose: aiohttp would wrap an OSError as a connection
    failure and the retry policy would try again, where this answer will not change.
    """

    def __init__(self, guard: OriginGuard) -> None:
        self._guard = guard
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self._guard.exempt_hosts:
            return results
        kept = [r for r in results if address_allowed(self._guard.rules, _address(r))]
        if not kept:
            self._guard.check_address(host, _address(results[0]))
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _address(result: ResolveResult) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(result["host"])
