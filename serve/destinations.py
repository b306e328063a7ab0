"""The SSRF guard for webhook destinations.

`check_destination` resolves the URL's host and refuses it when ANY address is private,
loopback, link-local, CGNAT, multicast, reserved or unspecified (IPv4 embedded in IPv6 — mapped,
6to4, NAT64 — is unwrapped first) unless the operator allows it; it returns the vetted addresses,
the only ones the dispatcher then connects to (DNS pinning, see `serve.webhooks`).
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, Iterable, Sequence

import httpx

from .settings import WebhookSettings

Resolver = Callable[[str, int], Sequence[str]]


class DestinationRefused(ValueError):
    """A webhook URL is not allowed; `param` is always "url" (maps to HTTP 400)."""

    param = "url"

    def __init__(self, message: str) -> None:
        super().__init__(f"url: {message}")
        self.message = message


_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HINT = "set webhook_allow_private or add the host or its network to webhook_allowlist"


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """IPv4 address carried inside an IPv6 one (mapped, 6to4, NAT64), which routes there."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _blocked_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is not a public unicast destination, or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            kind = _blocked_kind(inner)
            return f"{kind} (embeds IPv4 {inner})" if kind else None
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "carrier-grade NAT (100.64.0.0/10)"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def _parse_allowlist(allowlist: Iterable[str]) -> tuple[set[str], list[Any]]:
    hosts: set[str] = set()
    nets: list[Any] = []
    for entry in allowlist or ():
        entry = str(entry).strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            hosts.add(entry.lower().rstrip("."))
    return hosts, nets


def _default_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


def check_destination(url: str | httpx.URL, *, allow_private: bool = False,
                      allowlist: Iterable[str] = (), resolver: Resolver | None = None) -> list[str]:
    """Vet a webhook URL; returns the resolved addresses (strings, resolver order, no duplicates)
    that the caller must connect to — and only to — to defeat DNS rebinding.

    Refused (DestinationRefused naming why): a scheme other than http/https, a missing host,
    credentials in the URL, a host that does not resolve, and — unless `allow_private` — a host
    with ANY address that is private, loopback, link-local, CGNAT, multicast, reserved or
    unspecified. `allowlist` entries are host names (exact, case-insensitive: all of that
    host's addresses are allowed) or IPs/CIDRs (addresses inside are allowed).
    `resolver(host, port) -> [ip, ...]` defaults to getaddrinfo (tests inject one)."""
    try:
        u = url if isinstance(url, httpx.URL) else httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise DestinationRefused(f"malformed URL ({exc})") from None
    if u.scheme not in ("http", "https"):
        raise DestinationRefused(f"scheme {u.scheme or '(none)'!r} is not allowed; use http or https")
    if not u.raw_host:
        raise DestinationRefused("has no host")
    if u.userinfo:
        raise DestinationRefused("must not contain credentials (user:password@)")
    host = u.raw_host.decode("ascii")  # IDNA-encoded; IPv6 literals without brackets
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        addrs = list(dict.fromkeys(a.split("%", 1)[0] for a in (resolver or _default_resolver)(host, port)))
    except (OSError, UnicodeError) as exc:
        raise DestinationRefused(f"host {host!r} does not resolve ({exc})") from None
    if not addrs:
        raise DestinationRefused(f"host {host!r} does not resolve")
    if allow_private:
        return addrs
    allowed_hosts, allowed_nets = _parse_allowlist(allowlist)
    host_allowed = host.lower().rstrip(".") in allowed_hosts
    for a in addrs:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            raise DestinationRefused(f"host {host!r} resolved to an invalid address {a!r}") from None
        kind = _blocked_kind(ip)
        if kind is None or host_allowed or any(ip.version == n.version and ip in n for n in allowed_nets):
            continue
        where = f"address {ip}" if host == str(ip) else f"host {host!r} resolves to {ip}, which"
        raise DestinationRefused(f"{where} is {kind}; refused ({_HINT})")
    return addrs


def destination_error(url: str, settings: Any, *, resolver: Resolver | None = None) -> str | None:
    """Why `url` is refused under the webhook settings' `allow_private` / `allowlist` (a
    WebhookSettings, or a ServiceSettings' `webhooks`), or None when allowed."""
    hooks: WebhookSettings = getattr(settings, "webhooks", settings)
    try:
        check_destination(url, allow_private=hooks.allow_private, allowlist=hooks.allowlist, resolver=resolver)
    except DestinationRefused as exc:
        return str(exc)
    return None
