"""Debian's dnsmasq on a loopback port, answering a name with the addresses a test sets.

The stand-in for cluster DNS answering a headless Service: ``set_hosts`` rewrites the hosts
file dnsmasq serves and sends it SIGHUP (dnsmasq re-reads it), then waits until the answer
changed, asked over real DNS. Stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.resolver

from tests.child_process import stop_child
from tests.support import require_binary

START_TIMEOUT_SECONDS = 10.0


def free_dns_port() -> int:
    """A loopback port free for both UDP and TCP (dnsmasq listens on both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


class DnsServer:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("dnsmasq")
        self.workdir = workdir
        self.port = free_dns_port()
        self.hosts = workdir / "hosts"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, addresses: Iterable[str]) -> DnsServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write(name, addresses)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--keep-in-foreground",
                "--user=root",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--local=/{name}/",  # answer it from the hosts file alone: NXDOMAIN when empty
                f"--addn-hosts={self.hosts}",
                "--local-ttl=0",
                "--pid-file=",
                "--log-facility=-",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "dnsmasq.log", "wb"),  # noqa: SIM115 - lives with proc
        )
        try:
            self.wait_for(name, sorted(addresses))
        except BaseException:
            self.stop()
            raise
        return self

    def _write(self, name: str, addresses: Iterable[str]) -> None:
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("".join(f"{a} {name}\n" for a in addresses))
        tmp.replace(self.hosts)

    def set_hosts(self, name: str, addresses: Iterable[str]) -> None:
        """Answer ``name`` with ``addresses`` from now on (none: NXDOMAIN)."""
        assert self.proc is not None
        wanted = sorted(addresses)
        self._write(name, wanted)
        os.kill(self.proc.pid, signal.SIGHUP)
        self.wait_for(name, wanted)

    def answer(self, name: str) -> list[str]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 1.0
        try:
            return sorted(r.to_text() for r in resolver.resolve(name, "A"))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []

    def wait_for(self, name: str, wanted: list[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = (self.workdir / "dnsmasq.log").read_text(errors="replace")
                raise RuntimeError(f"dnsmasq exited: {log}")
            try:
                last = self.answer(name)
                if last == wanted:
                    return
            except dns.exception.DNSException as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"dnsmasq answers {last!r} for {name}, wanted {wanted}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_child(proc)
