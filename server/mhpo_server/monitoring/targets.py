"""Which webhook targets the server may reach: public addresses only, unless allow-listed.

A webhook URL is chosen by whoever holds a write token, and the server POSTs to it from
inside its own network, so an unchecked URL reaches the cloud metadata service
(169.254.169.254, `[fd00:ec2::254]`, metadata.google.internal), databases on loopback or
anything on the private network. The policy refuses loopback, link-local, private,
shared (CGNAT), multicast, unspecified, site-local (`fec0::/10`) and other reserved
addresses, including IPv4 embedded in IPv6 (`::ffff:127.0.0.1`, NAT64 `64:ff9b::/96`, 6to4
`2002::/16`), hosts spelled with trailing dots (`127.0.0.1..`), URLs with credentials and
URLs longer than `max_url_length` (MHPO_WEBHOOK_MAX_URL_LENGTH).

It is applied twice: `check_url` when a rule is saved (literal addresses and well-known
internal names, so the mistake is a 422), and `resolve` at every delivery on the addresses
the name resolves to right then (so a name that later resolves inside, DNS rebinding,
is refused); the delivery then connects to exactly the address that was checked.
An operator allows a self-hosted receiver with `allow_hosts` (host names, trusted with
whatever they resolve to) or `allow_cidrs` (address ranges).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names that are internal wherever the server runs (cloud metadata services, loopback).
INTERNAL_NAMES = frozenset(
    {"localhost", "metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal"}
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
DEFAULT_MAX_URL_LENGTH = 2048
ALLOW_HINT = "to deliver to an internal receiver, allow it with MHPO_WEBHOOK_ALLOW_HOSTS or MHPO_WEBHOOK_ALLOW_CIDRS"


class TargetRefused(ValueError):
    """The URL or the address it resolves to is not a permitted webhook target."""


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, compatible, NAT64), else `ip` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
            return ipaddress.IPv4Address(int(ip))
    return ip


def address_kind(ip: IPAddress) -> str | None:
    """Why `ip` is internal ("loopback", "private", ...), or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local"
    ip = embedded_ipv4(ip)
    for kind, test in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if test:
            return kind
    return None if ip.is_global else "reserved"


def _host_literal(host: str) -> IPAddress | None:
    """The address a literal host stands for, in every spelling the system resolver accepts
    (`2852039166`, `0x7f000001`, `0177.0.0.1`, `127.1` are all IPv4 addresses to it)."""
    bare = host.strip("[]").split("%", 1)[0].rstrip(".")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except (OSError, UnicodeError, ValueError):
        return None


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class TargetPolicy:
    allow_hosts: frozenset[str] = frozenset()
    allow_cidrs: tuple[IPNetwork, ...] = ()
    dns_timeout_s: float = 5.0
    max_url_length: int = DEFAULT_MAX_URL_LENGTH

    @classmethod
    def from_settings(
        cls,
        hosts: Iterable[str],
        cidrs: Iterable[str],
        dns_timeout_s: float = 5.0,
        max_url_length: int = DEFAULT_MAX_URL_LENGTH,
    ) -> TargetPolicy:
        return cls(
            allow_hosts=frozenset(_normal_host(h) for h in hosts if h.strip()),
            allow_cidrs=tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()),
            dns_timeout_s=dns_timeout_s,
            max_url_length=max_url_length,
        )

    def _allowed(self, host: str, ip: IPAddress | None) -> bool:
        if _normal_host(host) in self.allow_hosts:
            return True
        return ip is not None and any(embedded_ipv4(ip) in net or ip in net for net in self.allow_cidrs)

    def check_address(self, host: str, ip: IPAddress) -> None:
        """Raise `TargetRefused` unless `ip` (what `host` resolved to) is public or allowed."""
        kind = address_kind(ip)
        if kind is not None and not self._allowed(host, ip):
            literal = _host_literal(host) is not None
            what = (
                f"{ip} is not a public address ({kind})"
                if literal
                else f"host {host} resolves to a non-public address ({kind})"
            )
            raise TargetRefused(f"{what}; {ALLOW_HINT}")

    def check_url(self, url: str) -> None:
        """What can be refused without DNS: length, scheme, credentials, literal addresses, internal names."""
        if len(url) > self.max_url_length:
            raise TargetRefused(
                f"the URL has {len(url)} characters, more than the limit of {self.max_url_length} "
                "(MHPO_WEBHOOK_MAX_URL_LENGTH): use a shorter URL"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise TargetRefused(f"scheme {parts.scheme!r} is not allowed: use http:// or https://")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused("credentials in the URL (user:pass@) are not allowed: put a secret in the path instead")
        host = parts.hostname or ""
        if not host:
            raise TargetRefused("the URL has no host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise TargetRefused(f"bad port: {exc}") from exc
        self.check_host(host)

    def check_host(self, host: str) -> None:
        """Refuse an internal literal address or a well-known internal name."""
        ip = _host_literal(host)
        if ip is not None:
            self.check_address(host, ip)
            return
        name = _normal_host(host)
        internal = name in INTERNAL_NAMES or name.endswith((".localhost", ".internal", ".local"))
        if internal and not self._allowed(host, None):
            raise TargetRefused(f"host {name} is an internal name; {ALLOW_HINT}")

    def resolve(
        self, host: str, port: int, resolver: ThreadPoolExecutor | None = None, timeout: float | None = None
    ) -> list[str]:
        """Every address `host` resolves to, each checked; refused if any one is internal.

        Checking every address (not only the first) closes the trick of a name that
        answers one public and one internal address. `resolver` runs the lookup with a
        timeout (the system resolver has none of its own a caller can set).
        """
        self.check_host(host)
        literal = _host_literal(host)
        if literal is not None:
            return [str(literal)]
        timeout = self.dns_timeout_s if timeout is None else min(timeout, self.dns_timeout_s)
        try:
            if resolver is None:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            else:
                infos = resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout)
        except (OSError, UnicodeError, FutureTimeout) as exc:
            raise TargetRefused(f"host {host} did not resolve") from exc
        addresses: list[str] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            self.check_address(host, ip)
            if str(ip) not in addresses:
                addresses.append(str(ip))
        if not addresses:
            raise TargetRefused(f"host {host} did not resolve")
        return addresses
