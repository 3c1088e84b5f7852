"""The small grammars references are made of: digests, host names, ports, IPv6 literals.
Pure (no I/O); each function returns the normalised part or raises ``RefError`` naming it."""

from __future__ import annotations

import ipaddress
import re

from cacheagent.errors import RefError

HEX = frozenset("0123456789abcdef")
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def digest_part(ref: str, text: str) -> str:
    if not text:
        raise RefError(ref, "digest", "empty digest after '@'")
    algorithm, colon, hex_part = text.partition(":")
    if not colon:
        raise RefError(ref, "digest", f"digest {text!r} must look like sha256:<64 hex>")
    if algorithm != "sha256":
        raise RefError(ref, "digest", f"unsupported digest algorithm {algorithm!r} (only sha256)")
    return "sha256:" + sha256_hex_part(ref, "digest", hex_part)


def sha256_hex_part(ref: str, part: str, hex_part: str) -> str:
    bad = first_not_in(hex_part, HEX)
    if bad is not None:
        kind = "lowercase hex" if bad in "ABCDEF" else "hex"
        raise RefError(ref, part, f"sha256 digest must be {kind}, found {bad!r}")
    if len(hex_part) != 64:
        raise RefError(ref, part, f"sha256 digest must be 64 hex characters, got {len(hex_part)}")
    return hex_part


def host_port_part(ref: str, text: str, part: str, default_port: int | None) -> str:
    """Normalise ``host[:port]`` (``[v6]:port`` too); drops ``default_port`` when given."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise RefError(ref, part, f"unclosed '[' in {text!r}")
        host = ipv6_part(ref, part, text[1:end])
        tail = text[end + 1 :]
        if tail and not tail.startswith(":"):
            raise RefError(ref, part, f"unexpected {tail!r} after IPv6 address")
        port_text = tail[1:] if tail else None
    else:
        host_text, colon, port_text_raw = text.partition(":")
        host = hostname_part(ref, part, host_text)
        port_text = port_text_raw if colon else None
    if port_text is None:
        return host
    port = port_part(ref, port_text)
    return host if port == default_port else f"{host}:{port}"


def ipv6_part(ref: str, part: str, text: str) -> str:
    try:
        return f"[{ipaddress.IPv6Address(text).compressed}]"
    except ValueError:
        raise RefError(ref, part, f"{text!r} is not an IPv6 address") from None


def hostname_part(ref: str, part: str, text: str) -> str:
    if not text:
        raise RefError(ref, part, "empty host name")
    host = text.lower()
    for label in host.split("."):
        if not label:
            raise RefError(ref, part, f"empty label in host name {text!r}")
        if not _HOST_LABEL_RE.fullmatch(label):
            raise RefError(
                ref,
                part,
                f"host label {label!r} must be 1-63 letters, digits or '-', "
                "not starting or ending with '-'",
            )
    return host


def port_part(ref: str, text: str) -> int:
    if not text:
        raise RefError(ref, "port", "empty port after ':'")
    if not (text.isascii() and text.isdigit()):
        raise RefError(ref, "port", f"port {text!r} must be a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise RefError(ref, "port", f"port {port} out of range 1-65535")
    return port


def first_not_in(text: str, allowed: frozenset[str]) -> str | None:
    return next((char for char in text if char not in allowed), None)
