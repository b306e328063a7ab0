"""The SSRF guard for webhook destinations and user-supplied photo URLs (`fetch_url`).

`check_destination` resolves the URL's host and refuses it when ANY address is private,
loopback, link-local, CGNAT, multicast, reserved or unspecified (IPv4 embedded in IPv6 — mapped,
6to4, NAT64 — is unwrapped first) unless the operator allows it; it returns the vetted addresses,
the only ones the dispatcher then connects to (DNS pinning, see `serve.webhooks`).
"""
from __future__ import annotations

import ipaddress
import socket
import time
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


# --------------------------------------------------------------------------------------------
# Fetching a user-supplied URL (percify photos) under the same guard
# --------------------------------------------------------------------------------------------
class FetchRefused(ValueError):
    """A user-supplied URL could not be fetched safely; the message says why (maps to a 400
    naming the field)."""


MAX_REDIRECTS = 3
_PHOTO_HINT = "set photo_fetch_allow_private or add the host or its network to photo_fetch_allowlist"


def fetch_url(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool = False,
              allowlist: Iterable[str] = (), resolver: Resolver | None = None,
              accept: str = "image/jpeg, image/png, image/webp", user_agent: str = "avatar-engine-fetch/1.0",
              max_redirects: int = MAX_REDIRECTS) -> bytes:
    """GET `url` through the SSRF guard the webhooks use, and return its body.

    Every hop is vetted by `check_destination` and connected to by vetted IP only (DNS pinning,
    `Host` and TLS SNI keep the name); redirects are followed by hand, at most `max_redirects`,
    each re-vetted (so a public URL cannot redirect to a private address); environment proxies
    are ignored; `timeout_s` bounds the whole fetch, redirects and body included; the body is
    refused past `max_bytes` (declared or streamed) and when its Content-Type is declared and
    not an image. Raises FetchRefused."""
    deadline = time.monotonic() + timeout_s
    current = url
    for _hop in range(max_redirects + 1):
        try:
            addrs = check_destination(current, allow_private=allow_private, allowlist=allowlist, resolver=resolver)
        except DestinationRefused as exc:
            raise FetchRefused(exc.message.replace(_HINT, _PHOTO_HINT)) from None
        u = httpx.URL(current)
        headers = {"host": u.netloc.decode("ascii"), "user-agent": user_agent, "accept": accept}
        extensions = {"sni_hostname": u.raw_host.decode("ascii")} if u.scheme == "https" else {}
        error = "no address tried"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchRefused(f"timed out after {timeout_s:g} s")
        with httpx.Client(timeout=remaining, follow_redirects=False, trust_env=False,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            for ip in addrs[:3]:
                request = client.build_request("GET", u.copy_with(host=ip), headers=headers, extensions=extensions)
                try:
                    response = client.send(request, stream=True)
                except httpx.ConnectError as exc:
                    error = f"connection to {ip} failed: {exc or type(exc).__name__}"
                    continue
                except httpx.TimeoutException:
                    raise FetchRefused(f"timed out after {timeout_s:g} s") from None
                except (httpx.HTTPError, OSError) as exc:
                    raise FetchRefused(f"{type(exc).__name__}: {exc}"[:300]) from None
                try:
                    if response.status_code in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            raise FetchRefused(f"HTTP {response.status_code} without a Location")
                        current = str(u.join(location))
                        break
                    if response.status_code != 200:
                        raise FetchRefused(f"HTTP {response.status_code}")
                    return _read_body(response, max_bytes, deadline, timeout_s)
                finally:
                    response.close()
            else:
                raise FetchRefused(error)
    raise FetchRefused(f"more than {max_redirects} redirects")


def _read_body(response: httpx.Response, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise FetchRefused(f"Content-Type {ctype!r} is not an image")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchRefused(f"the image is {int(declared)} bytes; the limit is {max_bytes}")
    body = bytearray()
    try:
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > max_bytes:
                raise FetchRefused(f"the image is larger than the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchRefused(f"timed out after {timeout_s:g} s")
    except httpx.TimeoutException:
        raise FetchRefused(f"timed out after {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchRefused(f"{type(exc).__name__}: {exc}"[:300]) from None
    return bytes(body)
